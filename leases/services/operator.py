"""Manual interventions from the console (admin actions and edits) and the operators' commands.

Each function acts on one lease through the transition function and raises ``LeaseError`` with
a precise message when the lease is in the wrong state or a worker holds it; nothing is changed
then. Cancelling lives in ``leases.services.cancellation``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from leases import events
from leases.models import LeaseStatus, MemberLease
from leases.services.cancellation import CancelOutcome, lease_cancel
from leases.services.sync import joins_sync
from leases.services.transfers import lease_transfer_start, transfers_run
from leases.services.transitions import LeaseError, lease_claim, lease_step, lease_transition, leases_release
from leases.timeutils import add_months
from leasesite.cli import MAX_MONTHS

logger = logging.getLogger(__name__)

__all__ = ["CancelOutcome", "lease_cancel", "lease_edit", "lease_force_transfer", "lease_reset", "lease_retry"]


def _enqueue_transfers(email: str) -> None:
    from leases.tasks import run_transfers

    transaction.on_commit(lambda: run_transfers.delay(email=email))


def _require(lease: MemberLease, status: str, message: str) -> None:
    if lease.status != status:
        raise LeaseError(message % {"id": lease.pk, "status": LeaseStatus(lease.status).label})


def lease_reset(*, lease_id: int, actor_id: int | None = None) -> MemberLease:
    """failed → active: the operator checked the member is seated in the lease's team."""
    lease = MemberLease.objects.get(pk=lease_id)
    _require(lease, LeaseStatus.FAILED, _("Lease %(id)s is %(status)s; only failed leases can be reset to active."))
    now = timezone.now()

    def changes(locked: MemberLease) -> dict:
        joined_at = locked.joined_at or now
        expires_at = locked.expires_at or add_months(joined_at, locked.term_months)
        return {
            "joined_at": joined_at,
            "expires_at": expires_at,
            "attempts": 0,
            "next_attempt_at": None,
            "last_error": "",
        }

    lease, _changed = lease_transition(
        lease_id=lease.pk,
        to_status=LeaseStatus.ACTIVE,
        actor_id=actor_id,
        expect_from=[LeaseStatus.FAILED],
        unclaimed=True,
        changes=changes,
        **events.reset(previous_error=lease.last_error),
    )
    return lease


def lease_retry(*, lease_id: int, actor_id: int | None = None) -> MemberLease:
    """failed → transferring with a fresh attempt budget; the executor picks it up at once."""
    lease = MemberLease.objects.get(pk=lease_id)
    _require(lease, LeaseStatus.FAILED, _("Lease %(id)s is %(status)s; only failed leases can be retried."))
    with transaction.atomic():
        lease, _changed = lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.TRANSFERRING,
            actor_id=actor_id,
            expect_from=[LeaseStatus.FAILED],
            unclaimed=True,
            changes={"attempts": 0, "next_attempt_at": timezone.now(), "last_error": ""},
            **events.retry(previous_error=lease.last_error),
        )
        _enqueue_transfers(lease.email)
    return lease


def lease_force_transfer(*, lease_id: int, actor_id: int | None = None) -> MemberLease:
    """active → transferring now, before the term is over. The operator claims the lease for the
    start (so no worker moves it at the same moment), then the executor takes over."""
    lease = MemberLease.objects.select_related("team").get(pk=lease_id)
    _require(lease, LeaseStatus.ACTIVE, _("Lease %(id)s is %(status)s; only active leases can be transferred."))
    owner = f"operator-{uuid.uuid4().hex[:12]}"
    if not lease_claim(lease_id=lease.pk, owner=owner):
        raise LeaseError(
            _("Lease %(id)s is being worked on by a transfer right now; try again in a minute.") % {"id": lease.pk}
        )
    try:
        with transaction.atomic():
            lease = lease_transfer_start(lease=lease, now=timezone.now(), owner=owner, actor_id=actor_id, forced=True)
            _enqueue_transfers(lease.email)
    finally:
        leases_release(lease_ids=[lease.pk], owner=owner)
    return lease


# Fields an operator may edit on a lease; everything else belongs to the workflow.
EDITABLE_FIELDS = ("term_months", "total_months", "ends_at")


def lease_edit(*, lease_id: int, actor_id: int | None = None, **values: Any) -> MemberLease:
    """An operator's edit of a lease's terms (``term_months``, ``total_months``, ``ends_at``),
    validated, written through the transition function with an ``edited`` event that records
    each change (old, new). The email is not editable: a seat belongs to the address that redeemed
    it (cancel and redeem anew to move it)."""
    unknown = set(values) - set(EDITABLE_FIELDS)
    if unknown:
        raise LeaseError(_("These fields cannot be edited: %(fields)s.") % {"fields": ", ".join(sorted(unknown))})
    lease = MemberLease.objects.get(pk=lease_id)
    term = values.get("term_months", lease.term_months)
    total = values.get("total_months", lease.total_months)
    if not isinstance(term, int) or not 1 <= term <= MAX_MONTHS:
        raise LeaseError(_("The term must be between 1 and %(max)d months.") % {"max": MAX_MONTHS})
    if total is not None and (not isinstance(total, int) or not term <= total <= MAX_MONTHS):
        raise LeaseError(
            _("The entitlement must be at least one term and at most %(max)d months.") % {"max": MAX_MONTHS}
        )
    if "ends_at" in values and values["ends_at"] is not None and not isinstance(values["ends_at"], datetime):
        raise LeaseError(_("The entitlement end must be a date and time."))
    if lease.status in (LeaseStatus.CANCELLED, LeaseStatus.EXPIRED):
        raise LeaseError(
            _("Lease %(id)s is %(status)s; a closed lease cannot be edited.")
            % {"id": lease.pk, "status": LeaseStatus(lease.status).label}
        )
    changes = {name: value for name, value in values.items() if getattr(lease, name) != value}
    if not changes:
        return lease
    recorded = {name: (_jsonable(getattr(lease, name)), _jsonable(value)) for name, value in changes.items()}
    try:
        return lease_step(
            lease_id=lease.pk, actor_id=actor_id, unclaimed=True, changes=changes, **events.edited(changes=recorded)
        )
    except IntegrityError as exc:
        raise LeaseError(_("The database refused the edit: %(error)s") % {"error": exc}) from None


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass
class EmailRunReport:
    email: str
    synced_teams: list[str] = field(default_factory=list)
    transfers: dict[str, int] = field(default_factory=dict)
    status: str = ""


def run_for_email(email: str) -> EmailRunReport:
    """Everything the engine would do for one customer, now: join sync of their team, then any
    due transfer. For operators answering "why is X not in a team?"."""
    email = email.strip().lower()
    report = EmailRunReport(email=email)
    report.synced_teams = [r.team for r in joins_sync(email=email)]
    report.transfers = transfers_run(email=email).summary()
    latest = MemberLease.objects.filter(email__iexact=email).order_by("-created_at", "-pk").first()
    report.status = latest.status if latest else ""
    return report


def lease_note(*, lease_id: int, actor_id: int | None, text: str) -> MemberLease:
    """An operator's note in the lease's history."""
    text = (text or "").strip()
    if not text:
        raise LeaseError(_("A note cannot be empty."))
    return lease_step(lease_id=lease_id, actor_id=actor_id, **events.note(text=text))
