"""The public pages: redeem a code (``/redeem/``), look a seat up by code and email
(``/redeem/status/``), and a lease's status page — in the customers' words, never an internal
error."""

from __future__ import annotations

import hashlib

from django import forms
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_http_methods

from leases.models import LeaseAction, LeaseStatus
from leases.selectors import lease_by_code_and_email, lease_by_public_id
from leases.services.redemption import RedemptionError, code_redeem
from leases.services.waiting import waiting_position
from leasesite.clientip import client_address
from leasesite.ratelimit import attempts_allow

# Events a customer sees on the status page (operator notes and retries stay in the console).
PUBLIC_ACTIONS = {
    LeaseAction.REDEEMED,
    LeaseAction.WAITING,
    LeaseAction.SEATED,
    LeaseAction.RENEWED,
    LeaseAction.INVITED,
    LeaseAction.REINVITED,
    LeaseAction.JOINED,
    LeaseAction.TRANSFER_STARTED,
    LeaseAction.TRANSFERRED,
    LeaseAction.EXPIRED,
    LeaseAction.CANCELLED,
}


# What each status means to a customer (the console's labels are the operators').
CUSTOMER_STATUS = {
    LeaseStatus.WAITING: gettext_lazy("Waiting for a free seat"),
    LeaseStatus.PENDING: gettext_lazy("Waiting for you to accept the invitation"),
    LeaseStatus.ACTIVE: gettext_lazy("Active"),
    LeaseStatus.TRANSFERRING: gettext_lazy("Moving to a new team"),
    LeaseStatus.FAILED: gettext_lazy("Being processed"),
    LeaseStatus.CANCELLED: gettext_lazy("Cancelled"),
    LeaseStatus.EXPIRED: gettext_lazy("Ended"),
}


class RedeemForm(forms.Form):
    code = forms.CharField(label=gettext_lazy("Redemption code"), max_length=64, strip=True)
    email = forms.EmailField(label=gettext_lazy("Email"), max_length=254)


@require_http_methods(["GET", "POST"])
def redeem(request: HttpRequest) -> HttpResponse:
    form = RedeemForm(request.POST or None)
    status = 200
    if request.method == "POST":
        throttled = _throttled(request, form, "leases/redeem.html", "redeem")
        if throttled is not None:
            return throttled
        if form.is_valid():
            try:
                lease = code_redeem(code=form.cleaned_data["code"], email=form.cleaned_data["email"], invite_later=True)
            except RedemptionError as exc:
                form.add_error(None, str(exc))
                status = 400
            else:
                return redirect("leases:status", public_id=lease.public_id)
        else:
            status = 400
    return render(request, "leases/redeem.html", {"form": form}, status=status)


def _throttled(request: HttpRequest, form: forms.Form, template: str, scope: str) -> HttpResponse | None:
    """The per-address limit of the public forms (``LEASE_REDEEM_RATE_LIMIT`` per window)."""
    address = hashlib.sha256(client_address(request).encode()).hexdigest()[:32]
    if attempts_allow(
        key=f"{scope}:{address}",
        limit=settings.LEASE_REDEEM_RATE_LIMIT,
        window_seconds=settings.LEASE_REDEEM_RATE_WINDOW,
    ):
        return None
    form.add_error(None, _("Too many attempts from your address. Wait a few minutes and try again."))
    return render(request, template, {"form": form}, status=429)


class LookupForm(forms.Form):
    code = forms.CharField(label=gettext_lazy("Redemption code"), max_length=64, strip=True)
    email = forms.EmailField(label=gettext_lazy("Email"), max_length=254)


@require_http_methods(["GET", "POST"])
def lease_lookup(request: HttpRequest) -> HttpResponse:
    """Find one's seat again by code and email. A wrong pair says so without telling which half
    was wrong (nobody learns whether a code exists, or which email used it)."""
    form = LookupForm(request.POST or None)
    status = 200
    if request.method == "POST":
        throttled = _throttled(request, form, "leases/lookup.html", "lookup")
        if throttled is not None:
            return throttled
        if form.is_valid():
            lease = lease_by_code_and_email(code=form.cleaned_data["code"], email=form.cleaned_data["email"])
            if lease is not None:
                return redirect("leases:status", public_id=lease.public_id)
            form.add_error(None, _("No seat matches this code and email. Check both and try again."))
        status = 400
    return render(request, "leases/lookup.html", {"form": form}, status=status)


@require_http_methods(["GET"])
def lease_status(request: HttpRequest, public_id: str) -> HttpResponse:
    lease = lease_by_public_id(public_id)
    if lease is None:
        raise Http404(_("No such lease."))
    events = [event for event in lease.events.all() if event.action in PUBLIC_ACTIONS]
    context = {
        "lease": lease,
        "events": events,
        "customer_status": CUSTOMER_STATUS.get(lease.status, lease.get_status_display()),
        "queue_position": waiting_position(lease),
    }
    return render(request, "leases/status.html", context)
