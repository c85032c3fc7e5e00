"""Celery tasks: thin shells over ``leases.services``. They take ids, never objects, and are safe
to run twice at once (team sync locks, lease claims)."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import OperationalError

from leases.models import MemberLease
from leases.services.cancellation import lease_seats_free
from leases.services.invites import lease_invite
from leases.services.orphans import orphans_check
from leases.services.sync import joins_sync
from leases.services.transfers import transfers_run

logger = logging.getLogger(__name__)


@shared_task(name="leases.sync_joins", ignore_result=True, autoretry_for=(OperationalError,), max_retries=3)
def sync_joins(team_id: int | None = None) -> list[dict]:
    """Join sync of one team, or of every active team."""
    return [result.as_dict() for result in joins_sync(team_id=team_id)]


@shared_task(name="leases.run_transfers", ignore_result=True, autoretry_for=(OperationalError,), max_retries=3)
def run_transfers(email: str | None = None) -> dict[str, int]:
    """Move every due lease (or only ``email``'s)."""
    return transfers_run(email=email).summary()


@shared_task(name="leases.check_orphans", ignore_result=True)
def check_orphans() -> int:
    """Report members seated in two teams or without a lease. Returns the number of problems."""
    return orphans_check().problems


@shared_task(name="leases.invite_lease", ignore_result=True, autoretry_for=(OperationalError,), max_retries=3)
def invite_lease(lease_id: int) -> bool:
    """The first invite of a lease just redeemed on the web (no provider call inside the request).
    Idempotent: a lease already invited, or no longer pending, is left alone; an invite that fails
    is recorded and retried by the join sync; a lease deleted meanwhile is nothing to do."""
    try:
        return lease_invite(lease_id=lease_id, first=True)
    except MemberLease.DoesNotExist:
        logger.info("invite of lease %s not sent: the lease no longer exists", lease_id)
        return False


@shared_task(name="leases.free_seats", ignore_result=True, autoretry_for=(OperationalError,), max_retries=3)
def free_seats(lease_id: int, seats: list[list], actor_id: int | None = None) -> list[str]:
    """Free the seats of a lease an operator cancelled in the console: ``seats`` are
    ``[team_id, member_id]`` pairs. Freeing twice is harmless (a seat already free is done); a
    lease deleted meanwhile has no history to record it in (the orphan check shows the seat)."""
    try:
        return lease_seats_free(
            lease_id=lease_id, seats=[(team_id, member_id) for team_id, member_id in seats], actor_id=actor_id
        )
    except MemberLease.DoesNotExist:
        logger.warning("seats of lease %s not freed: the lease no longer exists", lease_id)
        return []


@shared_task(name="leases.send_reminders", ignore_result=True)
def send_reminders() -> dict[str, int]:
    """Reminder mails to customers: seats ending in LEASE_REMINDER_DAYS days, invitations not
    accepted after LEASE_ACCEPT_REMINDER_DAYS days. Each goes out once (recorded as an event)."""
    from leases.services.reminders import reminders_send

    return reminders_send().summary()
