"""The console's admin site: our own title, and the overview on its home page."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _


class LeasesiteAdminSite(admin.AdminSite):
    site_header = _("leasesite console")
    site_title = _("leasesite console")
    index_title = _("Overview")
    index_template = "admin/leasesite_index.html"

    def index(self, request: HttpRequest, extra_context: dict | None = None) -> TemplateResponse:
        from leasesite.overview import overview_build

        return super().index(request, {"overview": overview_build(request), **(extra_context or {})})


class LeasesiteAdminConfig(AdminConfig):
    """Replaces ``django.contrib.admin`` in INSTALLED_APPS so ``admin.site`` is ours everywhere."""

    default_site = "leasesite.admin_site.LeasesiteAdminSite"
