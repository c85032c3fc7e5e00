"""The client address of a request, the one way every throttle in the project reads it."""

from __future__ import annotations

from ipaddress import ip_address

from django.conf import settings
from django.http import HttpRequest


def client_address(request: HttpRequest) -> str:
    if settings.LEASE_REDEEM_TRUST_X_FORWARDED_FOR:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]  # the address our own proxy saw; earlier hops are client-controlled
    return request.META.get("REMOTE_ADDR", "") or "unknown"


def login_client_address(request: HttpRequest) -> str | None:
    """The address django-axes records for an admin login, or None when there is no valid one.

    Axes stores it in a GenericIPAddressField: on PostgreSQL (an ``inet`` column) anything that is
    not an address, such as ``unknown`` for a request made without one (``Client.force_login``, a
    login from a management shell) or a forged X-Forwarded-For hop, would make the login itself fail.
    """
    address = client_address(request)
    try:
        return str(ip_address(address))
    except ValueError:
        return None
