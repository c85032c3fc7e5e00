"""The admin's "扫码添加 Token" pages (a QR login, DESIGN §3), hung on the token admin.

Starting a login records it and queues ``tokens.qr_login_poll`` after commit; the pages only read
the ``QrLogin`` row (the login page polls a small JSON view of it). No view here waits on the
报名工具 API. The one exception is the demo's "scan it for me" button, which calls the bundled
fake's control endpoint and exists only when ``BAOMING_API_IS_FAKE`` is on for a loopback host.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import mark_safe
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST

from tokens.models import QrLogin, QrLoginStatus
from tokens.qrcodes import QrRenderError, is_picture, qr_svg
from tokens.services.qrlogin import qr_login_cancel, qr_login_create
from tokens.services.tokens import TokenValidationError

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

PAGE_POLL_MILLISECONDS = 1500
WORKER_HINT_AFTER = timedelta(seconds=10)


class ScanStartForm(forms.Form):
    card_name = forms.CharField(
        label=_("card name (名片)"),
        max_length=100,
        help_text=_("The card the token belongs to. The user name and avatar come from the WeChat login."),
        widget=forms.TextInput(attrs={"autofocus": True, "autocomplete": "off"}),
    )

    def clean_card_name(self) -> str:
        value = self.cleaned_data["card_name"].strip()
        if any(not char.isprintable() for char in value):
            raise forms.ValidationError(_("The card name contains a control character."))
        return value


def demo_scan_enabled() -> bool:
    """The demo's fake 报名工具 API runs on this machine and says it may be "scanned" for you."""
    if not settings.BAOMING_API_IS_FAKE:
        return False
    host = urlsplit(settings.BAOMING_API_BASE).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dispatch_poll(login_id: object) -> None:
    from tokens.tasks import qr_login_poll

    qr_login_poll.delay(str(login_id))


class QrLoginViews:
    """The views, bound to the ``BaomingTokenAdmin`` they hang on."""

    def __init__(self, model_admin: ModelAdmin) -> None:
        self.model_admin = model_admin
        self.opts = model_admin.opts

    def urls(self) -> list[URLPattern]:
        site = self.model_admin.admin_site
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("scan/", site.admin_view(self.start_view), name=f"{prefix}_scan"),
            path("scan/<uuid:login_id>/", site.admin_view(self.login_view), name=f"{prefix}_scan_login"),
            path("scan/<uuid:login_id>/status/", site.admin_view(self.status_view), name=f"{prefix}_scan_status"),
            path(
                "scan/<uuid:login_id>/cancel/",
                site.admin_view(require_POST(self.cancel_view)),
                name=f"{prefix}_scan_cancel",
            ),
            path(
                "scan/<uuid:login_id>/demo-scan/",
                site.admin_view(require_POST(self.demo_scan_view)),
                name=f"{prefix}_scan_demo",
            ),
        ]

    # --- helpers ---------------------------------------------------------------------------------

    def _url(self, name: str, *args: object) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_{name}",
            args=args,
            current_app=self.model_admin.admin_site.name,
        )

    def _require_add(self, request: HttpRequest) -> None:
        if not self.model_admin.has_add_permission(request):
            raise PermissionDenied

    def _context(self, request: HttpRequest, **extra: object) -> dict:
        return {**self.model_admin.admin_site.each_context(request), "opts": self.opts, **extra}

    @staticmethod
    def _seconds_left(login: QrLogin) -> int:
        return max(0, int((login.expires_at - timezone.now()).total_seconds()))

    @staticmethod
    def _shown_message(login: QrLogin) -> str:
        """The login's message; for a login no worker has touched yet, a hint why."""
        if (
            not login.message
            and login.status == QrLoginStatus.STARTING
            and login.polls == 0
            and timezone.now() - login.created_at > WORKER_HINT_AFTER
        ):
            return gettext("No worker has taken this login yet: is the Celery worker running?")
        return login.message

    @classmethod
    def _shown_status(cls, login: QrLogin) -> str:
        """The status to show: an open login past its expiry is over, even before a worker says so."""
        if login.is_open and cls._seconds_left(login) == 0:
            return QrLoginStatus.EXPIRED
        return login.status

    # --- views -----------------------------------------------------------------------------------

    def start_view(self, request: HttpRequest) -> HttpResponse:
        self._require_add(request)
        if request.method == "POST":
            form = ScanStartForm(request.POST)
            if form.is_valid():
                try:
                    login = qr_login_create(
                        card_name=form.cleaned_data["card_name"], requested_by=request.user, dispatch=_dispatch_poll
                    )
                except TokenValidationError as exc:
                    form.add_error("card_name", str(exc))
                else:
                    return HttpResponseRedirect(self._url("scan_login", login.pk))
        else:
            form = ScanStartForm(initial={"card_name": request.GET.get("card_name", "")[:100]})
        context = self._context(
            request,
            form=form,
            title=gettext("Add a token by scanning"),
            timeout_seconds=settings.BAOMING_QR_TIMEOUT,
        )
        return TemplateResponse(request, "admin/tokens/baomingtoken/scan_start.html", context)

    def login_view(self, request: HttpRequest, login_id: object) -> HttpResponse:
        self._require_add(request)
        login = get_object_or_404(QrLogin, pk=login_id)
        if login.status == QrLoginStatus.SUCCEEDED and login.token_id is not None:
            messages.success(request, login.message)
            return HttpResponseRedirect(
                reverse(
                    f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
                    args=[login.token_id],
                    current_app=self.model_admin.admin_site.name,
                )
            )
        shown_status = self._shown_status(login)
        qr_markup = picture = ""
        if shown_status == QrLoginStatus.WAITING and login.qrcode:
            if is_picture(login.qrcode):
                picture = login.qrcode  # checked by the client: data:image/<kind>;base64,<base64>
            else:
                try:
                    qr_markup = mark_safe(qr_svg(login.qrcode))  # noqa: S308 - markup written by segno
                except QrRenderError:
                    qr_markup = ""
        context = self._context(
            request,
            title=gettext("Add a token by scanning"),
            login=login,
            message=self._shown_message(login),
            status=shown_status,
            status_display=QrLoginStatus(shown_status).label,
            is_open=shown_status in (QrLoginStatus.STARTING, QrLoginStatus.WAITING),
            seconds_left=self._seconds_left(login),
            has_qr=shown_status == QrLoginStatus.WAITING and bool(login.qrcode),
            qr_markup=qr_markup,
            picture=picture,
            status_url=self._url("scan_status", login.pk),
            cancel_url=self._url("scan_cancel", login.pk),
            demo_scan_url=self._url("scan_demo", login.pk) if demo_scan_enabled() else "",
            again_url=self._url("scan") + "?" + urlencode({"card_name": login.card_name}),
            poll_milliseconds=PAGE_POLL_MILLISECONDS,
        )
        return TemplateResponse(request, "admin/tokens/baomingtoken/scan_login.html", context)

    def status_view(self, request: HttpRequest, login_id: object) -> JsonResponse:
        """What the login page polls: the row's state, read only."""
        self._require_add(request)
        login = get_object_or_404(QrLogin, pk=login_id)
        status = self._shown_status(login)
        return JsonResponse(
            {
                "status": status,
                "status_display": str(QrLoginStatus(status).label),
                "open": status in (QrLoginStatus.STARTING, QrLoginStatus.WAITING),
                "has_qr": bool(login.qrcode) and status == QrLoginStatus.WAITING,
                "seconds_left": self._seconds_left(login),
                "message": self._shown_message(login),
            },
            headers={"Cache-Control": "no-store"},
        )

    def cancel_view(self, request: HttpRequest, login_id: object) -> HttpResponse:
        self._require_add(request)
        login = get_object_or_404(QrLogin, pk=login_id)
        if qr_login_cancel(login_id=login.pk):
            messages.info(request, gettext("The login was cancelled; no token was stored."))
        return HttpResponseRedirect(self._url("scan_login", login.pk))

    def demo_scan_view(self, request: HttpRequest, login_id: object) -> HttpResponse:
        """Demo only: have the bundled fake "scan" this login's code (the code stays server-side)."""
        from leasesite.fakes.baoming_server import FakeScanError, fake_qr_scan

        self._require_add(request)
        if not demo_scan_enabled():
            raise Http404
        login = get_object_or_404(QrLogin, pk=login_id)
        if login.status != QrLoginStatus.WAITING or not login.code:
            messages.warning(request, gettext("This login is not waiting for a scan."))
        else:
            try:
                who = fake_qr_scan(base_url=settings.BAOMING_API_BASE, code=login.code)
            except FakeScanError as exc:
                messages.error(request, gettext("The demo scan did not work: %(reason)s") % {"reason": exc})
            else:
                messages.info(
                    request,
                    format_html(
                        gettext("Scanned (demo) as WeChat user {}: the next poll logs in."), who.get("uname", "-")
                    ),
                )
        return HttpResponseRedirect(self._url("scan_login", login.pk))
