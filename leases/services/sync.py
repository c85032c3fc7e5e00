"""Join sync: read each team's members and invites once, then settle every pending lease of it.

Per team: two paged listings (members, invites), one query for the team's open leases, then
batched writes: the joined leases go ``active`` in one ``leases_transition`` call, missed-sync
counters move in one UPDATE each way. Only re-invites (rare) cost a provider call per lease.

Teams are synced in parallel, ``LEASE_SYNC_CONCURRENCY`` at a time (threads, each with its own
database connection; every request still takes a slot of its provider host's shared limit, so
teams on one host never exceed ``LEASE_PROVIDER_RATE_LIMIT`` together). Each team keeps its own
rules: its sync lock, its batched transitions. The waiting-list drain and the low-seat check run
once, after every team is done.

A listing that fails, or a members listing that comes back empty while our leases say people are
seated there, changes nothing and raises an alert: a provider outage must never look like
"everybody left".
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext as _

from leases import events
from leases.models import LeaseAction, LeaseStatus, MemberLease, Team, TeamHealth
from leases.providers import ProviderError, ProviderMember, TeamDeadError, provider_for
from leases.services.health import team_record_listing_ok, team_record_provider_error
from leases.services.invites import lease_invite
from leases.services.transitions import leases_transition
from leases.timeutils import add_months
from leasesite.locks import lock_acquire, lock_release
from leasesite.notify import alert_problem, alert_resolved

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


class OpenLease(NamedTuple):
    """What the sync reads of a team's pending and active leases."""

    pk: int
    email: str
    status: str
    invited_at: datetime | None
    missed_syncs: int
    provider_member_id: str


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


def sync_alert_key(team_id: int) -> str:
    return f"leases:team:{team_id}:sync"


def _give_up(team: Team, result: TeamSyncResult, *, calls: int, error: str, body: str, alert: bool = True) -> None:
    """A sync that must not change anything: record why on the team and alert (once, while it
    keeps failing)."""
    result.provider_calls = calls
    result.ok, result.error = False, error
    _record_team_seen(team, members=None, invites=None, error=error)
    if not alert:
        return
    alert_problem(
        key=sync_alert_key(team.pk),
        title=_("Join sync failing for team %(team)s") % {"team": team.name},
        body=body,
    )


def _sync_locked(team: Team, email: str | None, result: TeamSyncResult) -> None:
    provider = None
    try:
        provider = provider_for(team)
        members = provider.list_members()
        invites = provider.list_invites()
    except ProviderError as exc:
        team_record_provider_error(team=team, error=exc, during="listing")
        _give_up(
            team,
            result,
            calls=provider.calls if provider is not None else 0,
            error=f"listing failed: {exc}",
            body=_("%(error)s. No lease was changed; the next sync tries again.") % {"error": exc},
            alert=not isinstance(exc, TeamDeadError),  # the team's health alert says it already
        )
        return
    result.members, result.invites = len(members), len(invites)

    leases = MemberLease.objects.filter(team=team, status__in=(LeaseStatus.PENDING, LeaseStatus.ACTIVE))
    if email:
        leases = leases.filter(email__iexact=email)
    # Plain rows, not model instances: a team of 1,000 leases is read for a few fields.
    leases = [OpenLease(*row) for row in leases.values_list(*OpenLease._fields)]

    if not members and any(lease.status == LeaseStatus.ACTIVE for lease in leases):
        seated = MemberLease.objects.filter(team=team, status=LeaseStatus.ACTIVE).count()
        _give_up(
            team,
            result,
            calls=provider.calls,
            error=f"suspicious listing: no members, but {seated} active lease(s)",
            body=_("The provider listed 0 members while %(count)d lease(s) are active there. Nothing was changed.")
            % {"count": seated},
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
        result.joined = _activate(team, joined)

    # Active leases whose member id we have not learnt yet (imported ones): one batched step.
    to_learn = {
        lease.pk: member_by_email[lease.email.lower()].id
        for lease in leases
        if lease.status == LeaseStatus.ACTIVE
        and not lease.provider_member_id
        and lease.email.lower() in member_by_email
    }
    if to_learn:
        leases_transition(
            lease_ids=to_learn,
            action=LeaseAction.MEMBER_SEEN,
            expect_from=[LeaseStatus.ACTIVE],
            unclaimed=True,
            changes=lambda lease: {"provider_member_id": to_learn[lease.pk]},
            detail=lambda lease: events.member_seen(team=team, member_id=to_learn[lease.pk])["detail"],
        )

    still_pending = [lease for lease in pending if lease.pk not in joined]
    never_invited = [lease.pk for lease in still_pending if lease.invited_at is None]
    seen_invited = [lease.pk for lease in still_pending if lease.email.lower() in invited_emails and lease.missed_syncs]
    missing = [
        lease for lease in still_pending if lease.email.lower() not in invited_emails and lease.invited_at is not None
    ]
    result.missing = len(missing)
    # The sync's own counters (not workflow: no event per sync), only while still pending.
    still = MemberLease.objects.filter(status=LeaseStatus.PENDING, team=team)
    if seen_invited:
        still.filter(pk__in=seen_invited).update(missed_syncs=0)
    if missing:
        still.filter(pk__in=[lease.pk for lease in missing]).update(missed_syncs=F("missed_syncs") + 1)

    threshold = settings.LEASE_REINVITE_AFTER_MISSED_SYNCS
    for lease in missing:
        if lease.missed_syncs + 1 >= threshold and lease_invite(
            lease_id=lease.pk, reinvite_after_missed=lease.missed_syncs + 1
        ):
            result.reinvited += 1
    for lease_id in never_invited:
        # The invite at redemption (or transfer) failed: try again now.
        if lease_invite(lease_id=lease_id, reason="not invited yet", first=True):
            result.invited += 1

    result.provider_calls = provider.calls
    _record_team_seen(team, members=len(members), invites=len(invites), error="")
    team_record_listing_ok(team=team)
    alert_resolved(
        key=sync_alert_key(team.pk),
        title=_("Join sync failing for team %(team)s") % {"team": team.name},
        body=_("The last sync of team %(team)s worked.") % {"team": team.name},
    )


def term_start(*, provider_joined_at: datetime | None, lease: MemberLease, now: datetime) -> datetime:
    """When a lease's term starts: the member's join time, but never before our own invite (or
    the redemption, if the invite time is unknown), and never in the future."""
    floor = lease.invited_at or lease.created_at
    joined = provider_joined_at or now
    return min(max(joined, floor), now)


def _activate(team: Team, joined: dict[int, ProviderMember]) -> int:
    """pending → active for the leases whose member appeared, in one batched transition."""
    now = timezone.now()

    def activation(lease: MemberLease) -> dict:
        member = joined[lease.pk]
        joined_at = term_start(provider_joined_at=member.joined_at, lease=lease, now=now)
        changes = {
            "joined_at": joined_at,
            "expires_at": add_months(joined_at, lease.term_months),
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
        action=events.joined(team=team, member_id="", joined_at=now, expires_at=now, provider_joined_at=None)["action"],
        expect_from=[LeaseStatus.PENDING],
        unclaimed=True,
        changes=activation,
        detail=lambda lease: events.joined(
            team=team,
            member_id=joined[lease.pk].id,
            joined_at=lease.joined_at,
            expires_at=lease.expires_at,
            provider_joined_at=joined[lease.pk].joined_at,
        )["detail"],
    )
    return len(done.changed)


def joins_sync(
    *, team_id: int | None = None, team_name: str | None = None, email: str | None = None
) -> list[TeamSyncResult]:
    """Sync every active team (or the one named, or the team(s) holding ``email``'s open lease)."""
    teams = Team.objects.filter(is_active=True).exclude(health=TeamHealth.DEAD).order_by("pk")
    if team_id is not None:
        teams = Team.objects.filter(pk=team_id)
    if team_name is not None:
        teams = Team.objects.filter(name=team_name)
    if email:
        teams = teams.filter(
            leases__email__iexact=email, leases__status__in=(LeaseStatus.PENDING, LeaseStatus.ACTIVE)
        ).distinct()
    teams = list(teams)
    results = _sync_teams(teams, email)
    pools = {team.pool for team in teams}
    # What the providers showed may have freed seats: the waiting list goes first.
    from leases.services.lowseats import lowseats_check
    from leases.services.waiting import waiting_drain

    waiting_drain()
    for pool in sorted(pools):
        lowseats_check(pool=pool)
    return results


def _sync_one(team: Team, email: str | None) -> TeamSyncResult:
    result = team_sync_joins(team=team, email=email)
    logger.info("join sync %s", result.as_dict())
    return result


def _sync_in_thread(team: Team, email: str | None) -> TeamSyncResult:
    """One pool thread, one team, on the thread's own database connection (closed at the end)."""
    try:
        close_old_connections()
        return _sync_one(team, email)
    finally:
        connection.close()


def _sync_teams(teams: list[Team], email: str | None) -> list[TeamSyncResult]:
    """Every team's sync, ``LEASE_SYNC_CONCURRENCY`` at a time; results in the teams' order.
    Inside a caller's transaction (threads could not see its rows) or on SQLite (one writer at a
    time: threads would only wait for each other's locks) they run one after another."""
    threads = min(settings.LEASE_SYNC_CONCURRENCY, len(teams))
    if threads <= 1 or connection.in_atomic_block or connection.vendor == "sqlite":
        return [_sync_one(team, email) for team in teams]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="join-sync") as pool:
        return list(pool.map(_sync_in_thread, teams, [email] * len(teams)))
