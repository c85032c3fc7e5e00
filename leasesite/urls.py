from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from leasesite import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("", RedirectView.as_view(pattern_name="leases:redeem", permanent=False), name="home"),
    path("", include("leases.urls")),
]
