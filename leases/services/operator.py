"""Manual interventions from the console (admin actions) and the operators' commands.

Each function acts on one lease through the transition function and raises ``LeaseError`` with
a precise message when the lease is in the wrong state; nothing is changed then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import FINAL_STATUSES, LeaseAction, LeaseStatus, MemberLease
from leases.providers import ProviderError
from leases.services.invites import seat_free
from leases.services.sync import joins_sync
from leases.services.transfers import UNCLAIMED, lease_transfer_start, transfers_run
from leases.services.transitions import LeaseError, lease_event_record, lease_transition
from leases.timeutils import add_months

logger = logging.getLogger(__name__)


def _enqueue_transfers(email: str) -> None:
    from leases.tasks import run_transfers

    transaction.on_commit(lambda: run_transfers.delay(email=email))


def lease_reset(*, lease_id: int, actor_id: int | None = None) -> MemberLease:
    """failed → active: the operator checked the member is seated in the lease's team."""
    lease = MemberLease.objects.get(pk=lease_id)
    if lease.status != LeaseStatus.FAILED:
        raise LeaseError(
            _("Lease %(id)s is %(status)s; only failed leases can be reset to active.")
            % {"id": lease.pk, "status": LeaseStatus(lease.status).label}
        )
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
        action=LeaseAction.RESET,
        actor_id=actor_id,
        expect_from=[LeaseStatus.FAILED],
        changes=changes,
        detail={"previous_error": lease.last_error[:500]},
    )
    return lease


def lease_retry(*, lease_id: int, actor_id: int | None = None) -> MemberLease:
    """failed → transferring with a fresh attempt budget; the executor picks it up at once."""
    lease = MemberLease.objects.get(pk=lease_id)
    if lease.status != LeaseStatus.FAILED:
        raise LeaseError(
            _("Lease %(id)s is %(status)s; only failed leases can be retried.")
            % {"id": lease.pk, "status": LeaseStatus(lease.status).label}
        )
    with transaction.atomic():
        lease, _changed = lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.TRANSFERRING,
            action=LeaseAction.RETRY,
            actor_id=actor_id,
            expect_from=[LeaseStatus.FAILED],
            changes={"attempts": 0, "next_attempt_at": timezone.now(), "last_error": ""},
            detail={"previous_error": lease.last_error[:500]},
        )
        _enqueue_transfers(lease.email)
    return lease


def lease_force_transfer(*, lease_id: int, actor_id: int | None = None) -> MemberLease:
    """active → transferring now, before the term is over."""
    lease = MemberLease.objects.select_related("team").get(pk=lease_id)
    if lease.status != LeaseStatus.ACTIVE:
        raise LeaseError(
            _("Lease %(id)s is %(status)s; only active leases can be transferred.")
            % {"id": lease.pk, "status": LeaseStatus(lease.status).label}
        )
    with transaction.atomic():
        lease = lease_transfer_start(lease=lease, now=timezone.now(), actor_id=actor_id, forced=True)
        _enqueue_transfers(lease.email)
    return lease


def lease_cancel(*, lease_id: int, actor_id: int | None = None, reason: str = "") -> MemberLease:
    """Any open state → cancelled (final); then the seat is freed at the provider (best effort)."""
    lease = MemberLease.objects.select_related("team", "transfer_team").get(pk=lease_id)
    if lease.status in FINAL_STATUSES:
        raise LeaseError(
            _("Lease %(id)s is already %(status)s.") % {"id": lease.pk, "status": LeaseStatus(lease.status).label}
        )
    # The old team (member id known) and, mid-transfer, the team already invited to.
    seats = [(lease.team, lease.provider_member_id)]
    if lease.transfer_team_id:
        seats.append((lease.transfer_team, ""))
    lease, _changed = lease_transition(
        lease_id=lease.pk,
        to_status=LeaseStatus.CANCELLED,
        action=LeaseAction.CANCELLED,
        actor_id=actor_id,
        changes={"next_attempt_at": None, **UNCLAIMED},
        detail={"reason": reason[:500]},
    )
    for team, member_id in seats:
        try:
            freed = seat_free(team=team, email=lease.email, member_id=member_id)
        except ProviderError as exc:
            lease_event_record(
                lease_id=lease.pk,
                action=LeaseAction.NOTE,
                actor_id=actor_id,
                detail={"team": team.name, "note": "seat not freed at the provider", "error": str(exc)[:300]},
            )
            continue
        lease_event_record(
            lease_id=lease.pk, action=LeaseAction.LEFT_OLD_TEAM, actor_id=actor_id, detail={"team": team.name, **freed}
        )
    return lease


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
