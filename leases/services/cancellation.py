"""Cancelling a lease: the operator's action, the ``cancel_lease`` command, and the transfer
executor honouring a cancel requested while it held the lease.

A cancel never races a worker: it claims the lease first. When a worker holds it (mid-transfer,
maybe inside a provider call), the cancel is left as a request on the lease (event
``cancel_requested``); the worker checks for it before each of its steps and cancels the lease
itself, freeing the seats it knows about — the old team's and the one it had invited to.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from leases import events
from leases.models import FINAL_STATUSES, LeaseAction, LeaseStatus, MemberLease, Team, TransferStep
from leases.providers import ProviderError
from leases.services.health import team_record_provider_error
from leases.services.invites import seat_free
from leases.services.transitions import LeaseError, lease_claim, lease_step, lease_transition, leases_release
from leasesite.locks import lock_acquire, lock_release

logger = logging.getLogger(__name__)


@dataclass
class CancelOutcome:
    lease: MemberLease
    cancelled: bool  # False: requested, the worker holding the lease will cancel it
    seats_not_freed: list[str]
    seats_queued: int = 0  # seats a worker frees (the console never calls a provider itself)


def _seats_to_free(lease: MemberLease) -> list[tuple[Team, str]]:
    """The old team (its member id, if known) and, mid-transfer, the team already invited to."""
    seats = [(lease.team, lease.provider_member_id)] if lease.team_id else []  # a waiting lease has none
    if lease.transfer_team_id and lease.transfer_step == TransferStep.INVITED:
        seats.append((lease.transfer_team, ""))
    return seats


def lease_cancel_claimed(
    *, lease_id: int, owner: str, actor_id: int | None, reason: str, free_seats_later: bool = False
) -> CancelOutcome:
    """Cancel a lease ``owner`` holds: the transition first (no worker can pick it up after
    that), then free its seats at the provider, each recorded — or, with ``free_seats_later``
    (a web request), leave that to the ``leases.free_seats`` task, sent after the commit."""
    lease = MemberLease.objects.select_related("team", "transfer_team").get(pk=lease_id)
    seats = _seats_to_free(lease)
    requested_at = lease.cancel_requested_at
    lease, _changed = lease_transition(
        lease_id=lease.pk,
        to_status=LeaseStatus.CANCELLED,
        actor_id=actor_id if actor_id is not None else lease.cancel_requested_by_id,
        claim=owner,
        changes={"cancel_reason": reason[:500]},
        **events.cancelled(reason=reason, requested_at=requested_at),
    )
    if free_seats_later:
        from leases.tasks import free_seats

        pairs = [[team.pk, member_id] for team, member_id in seats]
        transaction.on_commit(lambda: free_seats.delay(lease_id=lease.pk, seats=pairs, actor_id=actor_id))
        return CancelOutcome(lease=lease, cancelled=True, seats_not_freed=[], seats_queued=len(pairs))
    not_freed = lease_seats_free(lease_id=lease.pk, seats=seats, actor_id=actor_id)
    return CancelOutcome(lease=lease, cancelled=True, seats_not_freed=not_freed)


def lease_seats_free(*, lease_id: int, seats: list[tuple[Team | int, str]], actor_id: int | None = None) -> list[str]:
    """Free a cancelled lease's seats at their providers, each recorded as an event; the names of
    the teams where that failed (those show in the orphan check).

    Safe to deliver twice, also at once: the freeing holds a lock per lease (a second copy finds
    it taken and does nothing, saying so), and seats recorded as freed since the cancel are done.
    """
    owner = uuid.uuid4().hex
    lock_name = f"leases:free_seats:{lease_id}"
    if not lock_acquire(name=lock_name, owner=owner, ttl_seconds=settings.LEASE_CLAIM_TTL):
        logger.info("seats of lease %s are being freed by another worker: nothing done", lease_id)
        return []
    try:
        return _seats_free_locked(lease_id=lease_id, seats=seats, actor_id=actor_id)
    finally:
        lock_release(name=lock_name, owner=owner)


def _seats_free_locked(*, lease_id: int, seats: list[tuple[Team | int, str]], actor_id: int | None) -> list[str]:
    lease = MemberLease.objects.get(pk=lease_id)
    team_ids = [team if isinstance(team, int) else team.pk for team, _member in seats]
    teams = Team.objects.in_bulk(team_ids)
    # A task delivered twice frees nothing twice: seats recorded as freed since the cancel are done.
    cancelled_at = (
        lease.events.filter(action=LeaseAction.CANCELLED).order_by("-created_at").values_list("created_at", flat=True)
    ).first()
    done = set()
    if cancelled_at is not None:
        done = {
            detail.get("team")
            for detail in lease.events.filter(
                action=LeaseAction.LEFT_OLD_TEAM, created_at__gte=cancelled_at
            ).values_list("detail", flat=True)
        }
    not_freed = []
    for team_id, member_id in zip(team_ids, (member for _team, member in seats), strict=True):
        team = teams[team_id]
        if team.name in done:
            continue
        if team.is_dead:
            lease_step(lease_id=lease.pk, **events.left_old_team(team=team, skipped="team is dead"))
            continue
        try:
            freed = seat_free(team=team, email=lease.email, member_id=member_id)
        except ProviderError as exc:
            team_record_provider_error(team=team, error=exc, during="seat release")
            lease_step(lease_id=lease.pk, actor_id=actor_id, **events.seat_not_freed(team=team, error=str(exc)))
            not_freed.append(team.name)
            continue
        lease_step(lease_id=lease.pk, actor_id=actor_id, **events.left_old_team(team=team, freed=freed))
    # The freed seat goes to the waiting list first (first come, first served).
    from leases.services.waiting import waiting_drain

    waiting_drain(pool=lease.pool)
    return not_freed


def lease_cancel(
    *, lease_id: int, actor_id: int | None = None, reason: str = "", free_seats_later: bool = False
) -> CancelOutcome:
    """Any open state → cancelled (final), with its seats freed at the provider (best effort: a
    seat that cannot be freed is an event and shows in the orphan check). If a worker holds the
    lease, leave a cancel request the worker honours at its next step."""
    lease = MemberLease.objects.get(pk=lease_id)
    if lease.status in FINAL_STATUSES:
        raise LeaseError(
            _("Lease %(id)s is already %(status)s.") % {"id": lease.pk, "status": LeaseStatus(lease.status).label}
        )
    owner = f"cancel-{uuid.uuid4().hex[:12]}"
    if not lease_claim(lease_id=lease.pk, owner=owner):
        lease = lease_step(
            lease_id=lease.pk,
            actor_id=actor_id,
            changes={
                "cancel_requested_at": timezone.now(),
                "cancel_requested_by_id": actor_id,
                "cancel_reason": reason[:500],
            },
            **events.cancel_requested(reason=reason, claimed_by=lease.claimed_by),
        )
        return CancelOutcome(lease=lease, cancelled=False, seats_not_freed=[])
    try:
        return lease_cancel_claimed(
            lease_id=lease.pk, owner=owner, actor_id=actor_id, reason=reason, free_seats_later=free_seats_later
        )
    finally:
        leases_release(lease_ids=[lease.pk], owner=owner)


def lease_cancel_by_email(*, email: str, actor_id: int | None = None, reason: str = "") -> CancelOutcome:
    """The ``cancel_lease EMAIL`` command: the customer's one open lease."""
    lease = MemberLease.objects.filter(email__iexact=email.strip()).exclude(status__in=FINAL_STATUSES).first()
    if lease is None:
        raise LeaseError(_("No open lease for %(email)s.") % {"email": email.strip().lower()})
    return lease_cancel(lease_id=lease.pk, actor_id=actor_id, reason=reason)
