"""Seats at the provider: invite a lease's email to its team, free a seat, find a member.

Providers are called outside any transaction; what happened is then recorded through the
transition function (``lease_step``).
"""

from __future__ import annotations

import logging
import uuid

from django.utils import timezone

from leases import events
from leases.models import LeaseStatus, MemberLease, Team
from leases.providers import ProviderError, ProviderMember, provider_for
from leases.services.health import team_record_provider_error
from leases.services.transitions import LeaseError, lease_claim, lease_step, leases_release

logger = logging.getLogger(__name__)


def lease_invite(*, lease_id: int, reinvite_after_missed: int = 0, reason: str = "", first: bool = False) -> bool:
    """Invite a pending lease's email to its current team. True when the provider accepted it.

    ``first``: only a lease never invited yet (``invited_at`` unset) — the first invite after a
    redemption, or the join sync's retry of one that failed. A copy of that message delivered
    again after the invite was recorded (a lost ack), or the sync and the task at once, then
    finds the lease invited and leaves it alone, so the provider sees one invite.

    A failure is recorded as an ``invite_failed`` event and left for the join sync, which invites
    every pending lease that has no ``invited_at`` yet. A lease a worker holds, or that stopped
    being pending meanwhile, is left alone (False).

    The lease is claimed for the call (claim → call → record), so an operator's cancel meanwhile
    waits as a request and is honoured here once the invite is recorded: the seat it freed cannot
    be taken again by an invite still on its way.
    """
    if not _invitable(MemberLease.objects.select_related("team").get(pk=lease_id), first=first):
        return False
    owner = f"invite-{uuid.uuid4().hex[:12]}"
    if not lease_claim(lease_id=lease_id, owner=owner):
        return False  # a worker or an operator holds it
    try:
        lease = MemberLease.objects.select_related("team").get(pk=lease_id)
        team = lease.team
        if not _invitable(lease, first=first):  # it moved on (or was invited) before the claim
            return False
        try:
            provider_for(team).invite(lease.email)
        except ProviderError as exc:
            logger.warning("invite of lease %s to team %s failed: %s", lease.pk, team.name, exc)
            team_record_provider_error(team=team, error=exc, during="invite")
            _record(
                lease.pk,
                owner,
                events.invite_failed(team=team, error=str(exc), reason=reason),
                {"last_error": str(exc)[:500]},
            )
            invited = False
        else:
            event = (
                events.reinvited(team=team, missed_syncs=reinvite_after_missed)
                if reinvite_after_missed
                else events.invited(team=team, reason=reason)
            )
            invited = _record(
                lease.pk, owner, event, {"invited_at": timezone.now(), "missed_syncs": 0, "last_error": ""}
            )
        _honour_cancel_request(lease.pk, owner)
        return invited
    finally:
        leases_release(lease_ids=[lease_id], owner=owner)


def _invitable(lease: MemberLease, *, first: bool = False) -> bool:
    if first and lease.invited_at is not None:
        return False
    return lease.status == LeaseStatus.PENDING and not lease.team.is_dead


def _record(lease_id: int, owner: str, event: dict, changes: dict) -> bool:
    try:
        lease_step(lease_id=lease_id, expect_from=[LeaseStatus.PENDING], claim=owner, changes=changes, **event)
    except LeaseError as exc:  # the claim lapsed while we called
        logger.info("invite of lease %s not recorded: %s", lease_id, exc)
        return False
    return True


def _honour_cancel_request(lease_id: int, owner: str) -> None:
    from leases.services.cancellation import lease_cancel_claimed  # cancellation frees seats through here

    lease = MemberLease.objects.get(pk=lease_id)
    if lease.cancel_requested_at is None or lease.claimed_by != owner:
        return
    try:
        lease_cancel_claimed(lease_id=lease_id, owner=owner, actor_id=None, reason=lease.cancel_reason)
    except LeaseError as exc:  # the claim lapsed: the transfer executor honours the request
        logger.info("cancel request of lease %s left to the executor: %s", lease_id, exc)


def member_find(*, team: Team, email: str) -> ProviderMember | None:
    email = email.lower()
    return next((m for m in provider_for(team).list_members() if m.email == email), None)


def seat_free(*, team: Team, email: str, member_id: str = "") -> dict:
    """Free ``email``'s seat in ``team`` at the provider: remove the member (looked up by email when
    the id is not known) or, if they never joined, withdraw the invite — and then check the
    members again, since an invite accepted meanwhile makes a withdrawal answer 404 ("no such
    invite") while the person sits in the team. Returns what was done, for the event's detail;
    raises ProviderError."""
    provider = provider_for(team)
    if not member_id:
        match = member_find(team=team, email=email)
        member_id = match.id if match else ""
    if member_id:
        provider.remove_member(member_id)
        return {"member_id": member_id}
    provider.cancel_invite(email)
    joined_meanwhile = member_find(team=team, email=email)
    if joined_meanwhile is not None:
        provider.remove_member(joined_meanwhile.id)
        return {"member_id": joined_meanwhile.id, "invite_cancelled": True, "accepted_meanwhile": True}
    return {"member_id": None, "invite_cancelled": True}


def seat_whereabouts(*, teams: list[Team], email: str) -> dict:
    """Where ``email`` really sits among ``teams`` (member or invited), for a failed lease's record.
    Teams that cannot be listed are named as unknown."""
    seated, invited, unknown = [], [], []
    for team in teams:
        if team.is_dead:
            unknown.append(team.name)
            continue
        provider = provider_for(team)
        try:
            members = {m.email for m in provider.list_members()}
            invites = {i.email for i in provider.list_invites()}
        except ProviderError:
            unknown.append(team.name)
            continue
        if email.lower() in members:
            seated.append(team.name)
        elif email.lower() in invites:
            invited.append(team.name)
    return {"member_of": seated, "invited_to": invited, "whereabouts_unknown": unknown or None}
