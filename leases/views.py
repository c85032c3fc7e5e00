"""The public pages: redeem a code (``/redeem/``) and a lease's status page."""

from __future__ import annotations

import hashlib

from django import forms
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_http_methods

from leases.models import LeaseAction
from leases.selectors import lease_by_public_id
from leases.services.redemption import RedemptionError, code_redeem
from leasesite.clientip import client_address
from leasesite.ratelimit import attempts_allow

# Events a customer sees on the status page (operator notes and retries stay in the console).
PUBLIC_ACTIONS = {
    LeaseAction.REDEEMED,
    LeaseAction.INVITED,
    LeaseAction.REINVITED,
    LeaseAction.JOINED,
    LeaseAction.TRANSFER_STARTED,
    LeaseAction.TRANSFERRED,
    LeaseAction.EXPIRED,
    LeaseAction.CANCELLED,
}


class RedeemForm(forms.Form):
    code = forms.CharField(label=gettext_lazy("Redemption code"), max_length=64, strip=True)
    email = forms.EmailField(label=gettext_lazy("Email"), max_length=254)


@require_http_methods(["GET", "POST"])
def redeem(request: HttpRequest) -> HttpResponse:
    form = RedeemForm(request.POST or None)
    status = 200
    if request.method == "POST":
        address = hashlib.sha256(client_address(request).encode()).hexdigest()[:32]
        if not attempts_allow(
            key=f"redeem:{address}",
            limit=settings.LEASE_REDEEM_RATE_LIMIT,
            window_seconds=settings.LEASE_REDEEM_RATE_WINDOW,
        ):
            form.add_error(None, _("Too many attempts from your address. Wait a few minutes and try again."))
            return render(request, "leases/redeem.html", {"form": form}, status=429)
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


@require_http_methods(["GET"])
def lease_status(request: HttpRequest, public_id: str) -> HttpResponse:
    lease = lease_by_public_id(public_id)
    if lease is None:
        raise Http404(_("No such lease."))
    events = [event for event in lease.events.all() if event.action in PUBLIC_ACTIONS]
    return render(request, "leases/status.html", {"lease": lease, "events": events})
