"""Join sync: read each team's members and invites once, then settle every pending lease of it.

Per team: two paged listings (members, invites), one query for the team's open leases, then
batched writes: the joined leases go ``active`` in one ``leases_transition`` call, missed-sync
counters move in one UPDATE each way. Only re-invites (rare) cost a provider call per lease.

A listing that fails, or a members listing that comes back empty while our leases say people are
seated there, changes nothing and raises an alert: a provider outage must never look like
"everybody left".
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from leases.models import LeaseAction, LeaseStatus, MemberLease, Team
from leases.providers import ProviderError, ProviderMember, provider_for
from leases.services.invites import lease_invite
from leases.services.transitions import leases_transition
from leases.timeutils import add_months
from leasesite.locks import lock_acquire, lock_release
from leasesite.notify import alert_send

logger = logging.getLogger(__name__)

SYNC_LOCK_TTL_SECONDS = 600


@dataclass
class TeamSyncResult:
    team: str
    ok: bool = True
    skipped: str = ""
    error: str = ""
    members: int = 0
    invites: int = 0
    pending: int = 0
    joined: int = 0
    missing: int = 0
    reinvited: int = 0
    invited: int = 0
    provider_calls: int = 0
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "details"}


def _record_team_seen(team: Team, *, members: int | None, invites: int | None, error: str) -> None:
    values: dict = {"last_sync_error": error[:1000]}
    if not error:
        values.update(last_synced_at=timezone.now(), members_seen=members, invites_seen=invites)
    Team.objects.filter(pk=team.pk).update(**values)


def team_sync_joins(*, team: Team, email: str | None = None) -> TeamSyncResult:
    """Sync one team (optionally only the lease of ``email``). Safe to run twice at once: a second
    sync of the same team is skipped while the first holds the team's lock."""
    result = TeamSyncResult(team=team.name)
    lock_name = f"leases:sync:{team.pk}"
    owner = uuid.uuid4().hex
    if not lock_acquire(name=lock_name, owner=owner, ttl_seconds=SYNC_LOCK_TTL_SECONDS):
        result.ok, result.skipped = False, "another sync of this team is running"
        return result
    try:
        _sync_locked(team, email, result)
    finally:
        lock_release(name=lock_name, owner=owner)
    return result


def _give_up(team: Team, result: TeamSyncResult, *, calls: int, error: str, title: str, body: str) -> None:
    """A sync that must not change anything: record why on the team and alert."""
    result.provider_calls = calls
    result.ok, result.error = False, error
    _record_team_seen(team, members=None, invites=None, error=error)
    alert_send(title=title, body=body)


def _sync_locked(team: Team, email: str | None, result: TeamSyncResult) -> None:
    provider = provider_for(team)
    try:
        members = provider.list_members()
        invites = provider.list_invites()
    except ProviderError as exc:
        _give_up(
            team,
            result,
            calls=provider.calls,
            error=f"listing failed: {exc}",
            title=f"join sync failed for team {team.name}",
            body=f"{exc}. No lease was changed; the next sync tries again.",
        )
        return
    result.members, result.invites = len(members), len(invites)

    leases = MemberLease.objects.filter(team=team, status__in=(LeaseStatus.PENDING, LeaseStatus.ACTIVE))
    if email:
        leases = leases.filter(email__iexact=email)
    leases = list(leases.only("pk", "email", "status", "invited_at", "missed_syncs", "provider_member_id"))

    if not members and any(lease.status == LeaseStatus.ACTIVE for lease in leases):
        seated = MemberLease.objects.filter(team=team, status=LeaseStatus.ACTIVE).count()
        _give_up(
            team,
            result,
            calls=provider.calls,
            error=f"suspicious listing: no members, but {seated} active lease(s)",
            title=f"join sync: team {team.name} lists no members",
            body=f"The provider listed 0 members while {seated} lease(s) are active there. Nothing was changed.",
        )
        return

    member_by_email: dict[str, ProviderMember] = {m.email: m for m in members}
    invited_emails = {i.email for i in invites}
    pending = [lease for lease in leases if lease.status == LeaseStatus.PENDING]
    result.pending = len(pending)

    joined = {
        lease.pk: member_by_email[lease.email.lower()] for lease in pending if lease.email.lower() in member_by_email
    }
    if joined:

        def activation(lease: MemberLease) -> dict:
            member = joined[lease.pk]
            joined_at = member.joined_at or timezone.now()
            expires_at = add_months(joined_at, lease.term_months)
            changes = {
                "joined_at": joined_at,
                "expires_at": expires_at,
                "provider_member_id": member.id,
                "missed_syncs": 0,
                "attempts": 0,
                "last_error": "",
            }
            if lease.ends_at is None and lease.total_months:
                changes["ends_at"] = add_months(joined_at, lease.total_months)
            return changes

        done = leases_transition(
            lease_ids=joined,
            to_status=LeaseStatus.ACTIVE,
            action=LeaseAction.JOINED,
            expect_from=[LeaseStatus.PENDING],
            changes=activation,
            detail=lambda lease: {
                "team": team.name,
                "member_id": joined[lease.pk].id,
                "joined_at": lease.joined_at.isoformat(),
                "expires_at": lease.expires_at.isoformat(),
            },
        )
        result.joined = len(done.changed)

    # Active leases whose member id we have not learnt yet (imported ones): one batched update.
    to_learn = [
        lease
        for lease in leases
        if lease.status == LeaseStatus.ACTIVE
        and not lease.provider_member_id
        and lease.email.lower() in member_by_email
    ]
    for lease in to_learn:
        lease.provider_member_id = member_by_email[lease.email.lower()].id
    if to_learn:
        MemberLease.objects.bulk_update(to_learn, ["provider_member_id"], batch_size=500)

    still_pending = [lease for lease in pending if lease.pk not in joined]
    never_invited = [lease.pk for lease in still_pending if lease.invited_at is None]
    seen_invited = [lease.pk for lease in still_pending if lease.email.lower() in invited_emails and lease.missed_syncs]
    missing = [
        lease for lease in still_pending if lease.email.lower() not in invited_emails and lease.invited_at is not None
    ]
    result.missing = len(missing)
    if seen_invited:
        MemberLease.objects.filter(pk__in=seen_invited).update(missed_syncs=0)
    if missing:
        MemberLease.objects.filter(pk__in=[lease.pk for lease in missing]).update(missed_syncs=F("missed_syncs") + 1)

    threshold = settings.LEASE_REINVITE_AFTER_MISSED_SYNCS
    for lease in missing:
        if lease.missed_syncs + 1 >= threshold and lease_invite(
            lease_id=lease.pk,
            action=LeaseAction.REINVITED,
            detail={"reason": f"neither a member nor invited for {lease.missed_syncs + 1} syncs"},
        ):
            result.reinvited += 1
    for lease_id in never_invited:
        # The invite at redemption (or transfer) failed: try again now.
        if lease_invite(lease_id=lease_id, detail={"reason": "not invited yet"}):
            result.invited += 1

    result.provider_calls = provider.calls
    _record_team_seen(team, members=len(members), invites=len(invites), error="")


def joins_sync(
    *, team_id: int | None = None, team_name: str | None = None, email: str | None = None
) -> list[TeamSyncResult]:
    """Sync every active team (or the one named, or the team(s) holding ``email``'s open lease)."""
    teams = Team.objects.filter(is_active=True).order_by("pk")
    if team_id is not None:
        teams = Team.objects.filter(pk=team_id)
    if team_name is not None:
        teams = Team.objects.filter(name=team_name)
    if email:
        teams = teams.filter(
            leases__email__iexact=email, leases__status__in=(LeaseStatus.PENDING, LeaseStatus.ACTIVE)
        ).distinct()
    results = []
    for team in teams:
        result = team_sync_joins(team=team, email=email)
        logger.info("join sync %s", result.as_dict())
        results.append(result)
    return results
