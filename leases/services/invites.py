"""Inviting a lease's email to its team: call the provider outside any transaction, then record."""

from __future__ import annotations

import logging

from django.utils import timezone

from leases.models import LeaseAction, MemberLease, Team
from leases.providers import ProviderError, provider_for
from leases.services.transitions import lease_event_record

logger = logging.getLogger(__name__)


def lease_invite(*, lease_id: int, action: str = LeaseAction.INVITED, detail: dict | None = None) -> bool:
    """Invite the lease's email to its current team. True when the provider accepted it.

    A failure is recorded as an ``invite_failed`` event and left for the join sync, which invites
    every pending lease that has no ``invited_at`` yet.
    """
    lease = MemberLease.objects.select_related("team").get(pk=lease_id)
    team = lease.team
    try:
        provider_for(team).invite(lease.email)
    except ProviderError as exc:
        logger.warning("invite of lease %s to team %s failed: %s", lease.pk, team.name, exc)
        lease_event_record(
            lease_id=lease.pk,
            action=LeaseAction.INVITE_FAILED,
            detail={"team": team.name, "error": str(exc)[:500], **(detail or {})},
            last_error=str(exc)[:500],
        )
        return False
    lease_event_record(
        lease_id=lease.pk,
        action=action,
        detail={"team": team.name, **(detail or {})},
        invited_at=timezone.now(),
        missed_syncs=0,
        last_error="",
    )
    return True


def seat_free(*, team: Team, email: str, member_id: str = "") -> dict:
    """Free ``email``'s seat in ``team`` at the provider: remove the member (looked up by email when
    the id is not known) or, if they never joined, withdraw the invite. "Already gone" is done.
    Returns what was done, for the event's detail; raises ProviderError."""
    provider = provider_for(team)
    if not member_id:
        match = next((m for m in provider.list_members() if m.email == email.lower()), None)
        member_id = match.id if match else ""
    if member_id:
        provider.remove_member(member_id)
        return {"member_id": member_id}
    provider.cancel_invite(email)
    return {"member_id": None, "invite_cancelled": True}
