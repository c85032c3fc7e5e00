from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import LeaseAction, LeaseStatus, MemberLease, Team
from leases.providers import TransientProviderError
from leases.services.sync import joins_sync, team_sync_joins
from leases.timeutils import add_months
from leasesite.locks import lock_acquire, lock_release

pytestmark = pytest.mark.django_db


def _pending(make_lease, team: Team, provider, n: int, *, invited: bool = True) -> list[MemberLease]:
    leases = [make_lease(team) for _ in range(n)]
    if invited:
        for lease in leases:
            provider.state.team(team.name).invite(lease.email)
    return leases


def test_joined_members_become_active_with_the_providers_join_time(provider, make_team, make_lease):
    team = make_team("alpha")
    invited_at = datetime(2026, 1, 30, 2, 0, tzinfo=UTC)
    joined, waiting = make_lease(team, term_months=1, total_months=3, invited_at=invited_at), make_lease(team)
    created = MemberLease.objects.get(pk=joined.pk).created_at
    fake = provider.state.team("alpha")
    fake.invite(waiting.email)
    joined_at = datetime(2026, 1, 31, 2, 0, tzinfo=UTC)  # Jan 31st 10:00 in Shanghai
    member_id = fake.add_member(joined.email.upper(), joined_at=joined_at)

    [result] = joins_sync()

    assert (result.ok, result.joined, result.members, result.invites) == (True, 1, 1, 1)
    joined.refresh_from_db()
    assert joined.status == LeaseStatus.ACTIVE
    assert joined.joined_at == joined_at
    assert joined.expires_at == add_months(joined_at, 1) == datetime(2026, 2, 28, 2, 0, tzinfo=UTC)
    assert joined.ends_at == datetime(2026, 4, 30, 2, 0, tzinfo=UTC)  # total_months from the first join
    assert joined.created_at == created  # redemption time never changes
    assert joined.provider_member_id == member_id
    event = joined.events.get(action=LeaseAction.JOINED)
    assert (event.from_status, event.to_status, event.detail["member_id"]) == ("pending", "active", member_id)
    waiting.refresh_from_db()
    assert waiting.status == LeaseStatus.PENDING and waiting.missed_syncs == 0
    team.refresh_from_db()
    assert (team.members_seen, team.invites_seen, team.last_sync_error) == (1, 1, "")


def test_two_paged_listings_per_team_and_constant_queries(provider, make_team, make_lease, settings):
    settings.LEASE_PROVIDER_PAGE_SIZE = 10
    teams = [make_team(f"t{n}", capacity=200) for n in range(2)]
    counts = {}
    for size in (5, 40):
        for team in teams:
            leases = _pending(make_lease, team, provider, size)
            for lease in leases[: size // 2]:
                provider.state.team(team.name).accept(lease.email)
        before = provider.state.calls()
        with CaptureQueriesContext(connection) as queries:
            results = joins_sync()
        calls = provider.state.calls() - before
        assert all(r.ok for r in results)
        assert sum(r.joined for r in results) == 2 * (size // 2)
        members = sum(r.members for r in results) // 2
        invites = sum(r.invites for r in results) // 2
        pages = -(-members // 10) + max(1, -(-invites // 10))
        assert calls == 2 * pages  # two paged listings per team, nothing per lease
        counts[size] = len(queries)
        MemberLease.objects.update(status=LeaseStatus.CANCELLED)
        for team in teams:
            provider.state.team(team.name).members.clear()
            provider.state.team(team.name).invites.clear()
    assert counts[40] == counts[5], counts  # queries do not grow with the number of leases


def test_missing_three_syncs_in_a_row_is_reinvited(provider, make_team, make_lease, settings):
    settings.LEASE_REINVITE_AFTER_MISSED_SYNCS = 3
    team = make_team("alpha")
    lease = make_lease(team)  # invited (invited_at set) but the invite is gone at the provider
    make_lease(team, LeaseStatus.ACTIVE)
    provider.state.team("alpha").add_member("someone@else.io")
    for expected in (1, 2):
        joins_sync()
        lease.refresh_from_db()
        assert lease.missed_syncs == expected
        assert provider.state.team("alpha").invite_posts == []
    [result] = joins_sync()
    assert result.reinvited == 1
    lease.refresh_from_db()
    assert lease.missed_syncs == 0 and lease.status == LeaseStatus.PENDING
    assert provider.state.team("alpha").invited_emails() == {lease.email}
    event = lease.events.get(action=LeaseAction.REINVITED)
    assert "3 syncs" in event.detail["reason"]


def test_seen_again_resets_the_missed_counter(provider, make_team, make_lease):
    team = make_team("alpha")
    lease = make_lease(team)
    joins_sync()
    provider.state.team("alpha").invite(lease.email)
    joins_sync()
    lease.refresh_from_db()
    assert lease.missed_syncs == 0


def test_never_invited_leases_are_invited_by_the_sync(provider, make_team, make_lease):
    team = make_team("alpha")
    lease = make_lease(team, invited_at=None)
    [result] = joins_sync()
    assert result.invited == 1
    lease.refresh_from_db()
    assert lease.invited_at is not None
    assert provider.state.team("alpha").invited_emails() == {lease.email}


def test_failed_listing_changes_nothing_and_alerts(provider, make_team, make_lease, caplog):
    team = make_team("alpha")
    lease = make_lease(team)
    provider.state.team("alpha").add_member(lease.email)
    provider.state.team("alpha").fail_next.append(TransientProviderError("x", status=503))
    before = MemberLease.objects.values().get(pk=lease.pk)
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        [result] = joins_sync()
    assert not result.ok and "503" in result.error
    assert MemberLease.objects.values().get(pk=lease.pk) == before
    assert any(_("Join sync failing for team %(team)s") % {"team": "alpha"} in r.getMessage() for r in caplog.records)
    team.refresh_from_db()
    assert "503" in team.last_sync_error


def test_suspiciously_empty_listing_changes_nothing_and_alerts(provider, make_team, make_lease, caplog, settings):
    settings.LEASE_REINVITE_AFTER_MISSED_SYNCS = 1
    team = make_team("alpha")
    active = make_lease(team, LeaseStatus.ACTIVE)
    pending = make_lease(team)
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        [result] = joins_sync()
    assert not result.ok and "no members" in result.error
    assert any("listed 0 members" in r.getMessage() or "0 个成员" in r.getMessage() for r in caplog.records)
    pending.refresh_from_db()
    assert pending.missed_syncs == 0
    assert provider.state.team("alpha").invite_posts == []  # no re-invite storm
    active.refresh_from_db()
    assert active.status == LeaseStatus.ACTIVE


def test_a_sync_already_running_for_the_team_is_skipped(provider, make_team, make_lease):
    team = make_team("alpha")
    lease = make_lease(team)
    provider.state.team("alpha").add_member(lease.email)
    assert lock_acquire(name=f"leases:sync:{team.pk}", owner="other", ttl_seconds=60)
    result = team_sync_joins(team=team)
    assert not result.ok and result.skipped
    assert MemberLease.objects.get(pk=lease.pk).status == LeaseStatus.PENDING
    lock_release(name=f"leases:sync:{team.pk}", owner="other")
    assert team_sync_joins(team=team).joined == 1


def test_sync_one_email(provider, make_team, make_lease):
    team = make_team("alpha")
    mine, other = make_lease(team), make_lease(team)
    for lease in (mine, other):
        provider.state.team("alpha").add_member(lease.email)
    results = joins_sync(email=mine.email.upper())
    assert [r.joined for r in results] == [1]
    assert MemberLease.objects.get(pk=mine.pk).status == LeaseStatus.ACTIVE
    assert MemberLease.objects.get(pk=other.pk).status == LeaseStatus.PENDING


def test_inactive_teams_are_not_synced(provider, make_team, make_lease):
    make_team("off", is_active=False)
    assert joins_sync() == []
    assert provider.state.calls() == 0


def test_member_ids_are_learnt_for_active_leases(provider, make_team, make_lease):
    team = make_team("alpha")
    lease = make_lease(team, LeaseStatus.ACTIVE, joined_at=timezone.now() - timedelta(days=3))
    member_id = provider.state.team("alpha").add_member(lease.email)
    joins_sync()
    lease.refresh_from_db()
    assert lease.provider_member_id == member_id
