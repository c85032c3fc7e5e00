"""The client address of a request, the one way every throttle in the project reads it."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def client_address(request: HttpRequest) -> str:
    if settings.LEASE_REDEEM_TRUST_X_FORWARDED_FOR:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]  # the address our own proxy saw; earlier hops are client-controlled
    return request.META.get("REMOTE_ADDR", "") or "unknown"
