from django.urls import path

from leases import views

app_name = "leases"

urlpatterns = [
    path("redeem/", views.redeem, name="redeem"),
    path("redeem/status/", views.lease_lookup, name="lookup"),
    path("redeem/lease/<uuid:public_id>/", views.lease_status, name="status"),
]
