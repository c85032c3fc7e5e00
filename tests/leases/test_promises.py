"""Regression tests of "Keep every promise" (issue 7): nothing lost or double-seated under provider
outages, dead teams and operator edits. Each test names the defect it covers; each failed on the
code before the fix (through the same entry points: sync, transfers, orphan check, admin, export,
legacy import)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.providers import TransientProviderError
from leases.services.legacy import legacy_db_import
from leases.services.orphans import orphans_check
from leases.services.redemption import codes_export_csv, redeem
from leases.services.sync import joins_sync
from leases.services.transfers import transfers_run
from tests.leases.test_legacy_import import LEGACY_COLUMNS, write_legacy_db

pytestmark = pytest.mark.django_db


def _seated(provider, team: Team, lease: MemberLease) -> MemberLease:
    member_id = provider.state.team(team.name).add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    lease.refresh_from_db()
    return lease


def _alerts(caplog, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == "leasesite.alerts" and text in r.getMessage())


# -- defect 5: a provider's old joined_at ------------------------------------------------------------------
def test_a_member_the_provider_knew_for_years_gets_the_full_term_from_our_invite(provider, make_team, make_lease):
    alpha = make_team("alpha")
    make_team("beta")
    invited_at = timezone.now() - timedelta(hours=2)
    lease = make_lease(alpha, invited_at=invited_at)
    provider.state.team("alpha").add_member(lease.email, joined_at=datetime(2020, 3, 1, tzinfo=UTC))

    joins_sync()
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE
    assert lease.joined_at == invited_at  # the term starts at our invite, not in 2020
    assert lease.expires_at > timezone.now() + timedelta(days=27)
    joined = lease.events.get(action=LeaseAction.JOINED)
    assert joined.detail["provider_joined_at"].startswith("2020-03-01")

    assert transfers_run().claimed == 0  # nothing due: the entitlement is not lost
    assert lease.email in provider.state.team("alpha").member_emails()


# -- defect 6: a failed transfer leaves the member in two teams ---------------------------------------------
def test_a_failed_transfer_removes_the_member_from_the_new_team_when_they_had_accepted(
    provider, make_team, make_lease, settings
):
    settings.LEASE_TRANSFER_MAX_ATTEMPTS = 2
    old = make_team("old")
    make_team("new")
    now = timezone.now()
    lease = _seated(
        provider, old, make_lease(old, LeaseStatus.ACTIVE, joined_at=now - timedelta(days=31), expires_at=now)
    )
    old_fake, new_fake = provider.state.team("old"), provider.state.team("new")
    old_fake.fail_next.extend([TransientProviderError("down", status=503)] * 2)  # both removals fail

    assert transfers_run().summary() == {"claimed": 1, "retry": 1}
    new_fake.accept(lease.email)  # the customer accepts the new team's invite meanwhile
    lease.refresh_from_db()
    assert transfers_run(now=lease.next_attempt_at + timedelta(seconds=1)).summary() == {"claimed": 1, "failed": 1}

    lease.refresh_from_db()
    assert lease.status == LeaseStatus.FAILED and lease.team == old
    assert lease.email not in new_fake.member_emails() and lease.email not in new_fake.invited_emails()
    assert lease.email in old_fake.member_emails()  # exactly one team: the lease's
    failed = lease.events.get(action=LeaseAction.TRANSFER_FAILED)
    assert failed.detail["removed_from_target"] is True  # not the old "invite_cancelled: true" guess
    assert failed.detail["member_of"] == ["old"] and failed.detail["invited_to"] == []
    assert "old" in lease.last_error  # where the member really is, for the operator


def test_orphan_check_lists_stray_invites(provider, make_team, make_lease):
    a = make_team("a")
    pending = make_lease(a)
    provider.state.team("a").invite(pending.email)  # expected: its lease is pending there
    provider.state.team("a").invite("stray@example.com")  # a withdrawal that never happened
    report = orphans_check(alert=False)
    assert report.invites_without_lease == {"a": ["stray@example.com"]}
    assert report.problems == 1 and "stray@example.com" in report.as_text()


# -- defect 13 (legacy import): a join before the redemption -----------------------------------------------
def test_legacy_import_refuses_a_join_before_the_redemption(tmp_path: Path):
    Team.objects.create(name="Alpha", provider="memory", capacity=10)
    rows = [(1, "early@example.com", "Alpha", "active", "2026-02-01 10:00:00", "2026-01-01 10:00:00", None, 1)]
    report = legacy_db_import(path=write_legacy_db(tmp_path / "old.sqlite3", rows, LEGACY_COLUMNS))
    assert report.imported == 0
    [(legacy_id, reason)] = report.skipped
    assert legacy_id == "1" and reason.startswith("join_at (2026-01-01T10:00:00+08:00) is before start_at")
    assert not MemberLease.objects.exists()


# -- defect 15: what the design forbids, the database refuses -----------------------------------------------
def _refused(create) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        create()


def test_the_database_refuses_an_email_open_in_two_teams(make_team, make_lease):
    alpha, beta = make_team("alpha"), make_team("beta")
    make_lease(alpha, email="twice@example.com")
    _refused(lambda: MemberLease.objects.create(email="TWICE@example.com", team=beta, term_months=1))


def test_the_database_refuses_pending_with_a_join_time(make_team):
    alpha, now = make_team("alpha"), timezone.now()
    _refused(
        lambda: MemberLease.objects.create(
            email="p@example.com", team=alpha, term_months=1, joined_at=now, expires_at=now + timedelta(days=30)
        )
    )


def test_the_database_refuses_an_entitlement_shorter_than_the_term(make_team):
    alpha = make_team("alpha")
    _refused(lambda: MemberLease.objects.create(email="t@example.com", team=alpha, term_months=3, total_months=2))


def test_events_cannot_be_changed_or_deleted_even_in_raw_sql(make_team, make_lease, django_user_model):
    if connection.vendor != "postgresql":
        pytest.skip("the append-only trigger is PostgreSQL's (SQLite tests must be able to flush tables)")
    lease = make_lease(make_team("alpha"))
    user = django_user_model.objects.create_user("op", password="pw-op-123456")
    LeaseEvent.objects.create(lease=lease, action=LeaseAction.NOTE, actor=user, detail={"note": "x"})
    table = LeaseEvent._meta.db_table
    for statement in (f"UPDATE {table} SET detail = '{{}}'", f"DELETE FROM {table}"):
        with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement)
    user.delete()  # the events' actor becoming NULL is the one change allowed
    assert LeaseEvent.objects.filter(lease=lease).count() == 2


def test_an_admin_edit_goes_through_the_service_and_writes_an_event(admin_client, admin_user, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, term_months=1, total_months=3)
    url = reverse("admin:leases_memberlease_change", args=[lease.pk])
    response = admin_client.post(
        url,
        {
            "email": "someone-else@example.com",  # not editable: ignored
            "term_months": "2",
            "total_months": "6",
            "ends_at_0": "",
            "ends_at_1": "",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302
    lease.refresh_from_db()
    assert (lease.email, lease.term_months, lease.total_months) == (lease.email, 2, 6)
    assert lease.email != "someone-else@example.com"
    edited = lease.events.get(action=LeaseAction.EDITED)
    assert edited.actor == admin_user
    assert edited.detail["changes"] == {"term_months": [1, 2], "total_months": [3, 6]}


def test_an_admin_edit_that_breaks_a_rule_is_refused_and_changes_nothing(admin_client, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, term_months=2, total_months=4)
    response = admin_client.post(
        reverse("admin:leases_memberlease_change", args=[lease.pk]),
        {
            "term_months": "6",
            "total_months": "4",
            "ends_at_0": "",
            "ends_at_1": "",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200 and response.context["adminform"].form.errors  # shown, not saved
    lease.refresh_from_db()
    assert (lease.term_months, lease.total_months) == (2, 4)
    assert not lease.events.filter(action=LeaseAction.EDITED).exists()


# -- defect 16: CSV formula injection ------------------------------------------------------------------------
def test_the_codes_export_defuses_formulas(make_team, make_lease):
    lease = make_lease(make_team("alpha"), email="=1+2@example.com")
    RedemptionCode.objects.create(
        code="=HYPERLINK(1)", term_months=1, redeemed_at=timezone.now(), lease=lease, batch="@batch"
    )
    text = codes_export_csv(RedemptionCode.objects.select_related("lease"))
    row = text.splitlines()[1].split(",")
    assert row[0] == "'=HYPERLINK(1)" and row[3] == "'@batch" and row[-2] == "'=1+2@example.com"
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row)


# -- teams die; leases must not ---------------------------------------------------------------------------
def test_a_dead_team_is_marked_once_and_its_leases_move_to_a_healthy_team_of_its_pool(
    provider, make_team, make_lease, caplog
):
    dead = make_team("dead", api_token="revoked-token")  # the provider answers 401 to this team
    make_team("other-pool", pool="vip")
    healthy = make_team("healthy")
    active = _seated(provider, dead, make_lease(dead, LeaseStatus.ACTIVE))
    pending = make_lease(dead)

    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        for _run in range(3):
            joins_sync()  # every sync of the dead team's listing answers 401
        result = transfers_run()

    dead.refresh_from_db()
    assert dead.health == "dead" and "401" in dead.health_reason
    assert list(dead.events.values_list("action", "from_health", "to_health")) == [
        ("health_changed", "healthy", "dead")
    ]
    assert _alerts(caplog, str(dead.name)) == 1  # one alert for the team, not one per lease or per sync
    assert result.summary() == {"claimed": 2, "transferred": 2}
    for lease in (active, pending):
        lease.refresh_from_db()
        assert lease.team == healthy and lease.status == LeaseStatus.PENDING
        left = lease.events.get(action=LeaseAction.LEFT_OLD_TEAM)
        assert left.detail["team"] == "dead" and "team is dead" in left.detail["skipped"]
        assert lease.events.get(action=LeaseAction.TRANSFER_STARTED).detail["evacuation"] is True
    assert provider.state.team("healthy").invited_emails() == {active.email, pending.email}
    assert provider.state.team("other-pool").invite_posts == []  # never outside the pool
    assert provider.state.calls("dead", "DELETE") == 0  # no removal attempted at a dead team


def test_a_dead_team_takes_no_redemptions_and_an_operator_can_mark_it_healthy(
    admin_client, provider, make_team, make_code, caplog
):
    dead = make_team("dead", api_token="revoked-token")
    joins_sync()  # 401 → dead
    dead.refresh_from_db()
    assert dead.health == "dead"
    queued = redeem(code=make_code().code, email="new@example.com")  # no healthy team: no seat
    assert (queued.status, queued.team) == (LeaseStatus.WAITING, None)
    healthy = make_team("healthy")
    assert redeem(code=make_code().code, email="second@example.com").team == healthy

    with caplog.at_level(logging.INFO, logger="leasesite.alerts"):
        response = admin_client.post(
            reverse("admin:leases_team_changelist"),
            {"action": "mark_healthy", "_selected_action": [dead.pk], "confirmed": "yes"},
        )
    assert response.status_code == 302
    dead.refresh_from_db()
    assert dead.health == "healthy"
    assert dead.events.latest("id").actor is not None
    assert _alerts(caplog, _("Team %(team)s is healthy again") % {"team": "dead"}) == 1


def test_a_failing_sync_alerts_once_and_says_resolved_once(provider, make_team, make_lease, caplog):
    alpha = make_team("alpha")
    make_lease(alpha, LeaseStatus.ACTIVE)
    fake = provider.state.team("alpha")
    failing = _("Join sync failing for team %(team)s") % {"team": "alpha"}
    with caplog.at_level(logging.INFO, logger="leasesite.alerts"):
        for _run in range(4):
            fake.fail_next.append(TransientProviderError("down", status=503))
            joins_sync()
        alpha.refresh_from_db()
        assert alpha.health == "degraded"
        fake.add_member("someone@example.com")
        joins_sync()
        joins_sync()
    alpha.refresh_from_db()
    assert alpha.health == "healthy"
    assert _alerts(caplog, failing) == 2  # the start, and its "resolved"
    assert _alerts(caplog, _("Resolved: %(title)s") % {"title": failing}) == 1


def test_the_orphan_check_alerts_when_its_findings_change(provider, make_team, caplog):
    make_team("a")
    fake = provider.state.team("a")
    fake.add_member("stranger@example.com")
    with caplog.at_level(logging.INFO, logger="leasesite.alerts"):
        orphans_check()
        orphans_check()  # the same findings: silent
        fake.add_member("another@example.com")
        orphans_check()  # changed: said again
        fake.members.clear()
        orphans_check()  # gone: resolved
        orphans_check()
    assert _alerts(caplog, _("Orphan check: %(count)d problem(s)") % {"count": 1}) == 1
    assert _alerts(caplog, _("Orphan check: %(count)d problem(s)") % {"count": 2}) == 1
    assert _alerts(caplog, _("Resolved: %(title)s") % {"title": _("Orphan check")}) == 1


def test_one_provider_host_shares_one_rate_limit_and_honours_retry_after(provider, make_team, make_lease, settings):
    settings.LEASE_PROVIDER_RATE_LIMIT = 5
    settings.RATE_LIMIT_JITTER_ALLOWANCE = 0.05
    teams = [make_team(f"t{n}") for n in range(3)]  # three teams, one host
    for team in teams:
        make_lease(team)  # pending: invited, not joined yet
        provider.state.team(team.name).invite(f"{team.name}@example.com")
    provider.state.team("t0").fail_next.append(TransientProviderError("slow down", status=429, retry_after=1.0))
    started = time.monotonic()
    results = joins_sync()
    assert all(r.ok for r in results)  # the 429 was waited out and retried, not a failure
    times = sorted(provider.state.request_times)
    assert len(times) == 7  # 2 listings per team, plus the retried one
    first_after_throttle = times[1]  # the 429 was the very first request
    assert first_after_throttle - times[0] >= 0.95  # Retry-After honoured for every caller
    for index, moment in enumerate(times):
        in_window = [t for t in times[index:] if t - moment < 1.0]
        assert len(in_window) <= 5, (index, [round(t - started, 3) for t in times])


# -- cancel_lease (the operator's command) ---------------------------------------------------------------------
def test_cancel_lease_command_cancels_and_frees_the_seat(provider, make_team, make_lease, capsys):
    alpha = make_team("alpha")
    lease = _seated(provider, alpha, make_lease(alpha, LeaseStatus.ACTIVE, email="leaver@example.com"))
    call_command("cancel_lease", "Leaver@Example.com", "--reason", "refund")
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.CANCELLED
    assert lease.events.get(action=LeaseAction.CANCELLED).detail["reason"] == "refund"
    assert lease.email not in provider.state.team("alpha").member_emails()
    assert f"lease {lease.pk} (leaver@example.com) cancelled" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nobody@example.com"], "nobody@example.com"),
        (["not-an-email"], "not a valid email address"),
        (["x@example.com", "--reason", "r" * 501], "at most 500 characters"),
    ],
)
def test_cancel_lease_command_refuses_bad_input_and_changes_nothing(make_team, make_lease, argv, message):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, email="x@example.com")
    with pytest.raises(CommandError, match=message):
        call_command("cancel_lease", *argv)
    assert MemberLease.objects.get(pk=lease.pk).status == LeaseStatus.ACTIVE


def test_an_entitlement_that_ends_mid_transfer_withdraws_the_invite_to_the_next_team(provider, make_team, make_lease):
    """Found by the state-machine test: a transfer invites the member to the next team, the removal
    from the old team fails, and before the retry the entitlement ends. The lease must expire
    without leaving the member an invite (or a seat) in the team it was moving to."""
    old = make_team("old")
    make_team("new")
    now = timezone.now()
    lease = _seated(
        provider,
        old,
        make_lease(
            old,
            LeaseStatus.ACTIVE,
            joined_at=now - timedelta(days=31),
            expires_at=now - timedelta(minutes=1),
            ends_at=now + timedelta(days=1),
        ),
    )
    provider.state.team("old").fail_next.append(TransientProviderError("down", status=503))
    assert transfers_run(now=now).summary() == {"claimed": 1, "retry": 1}
    assert lease.email in provider.state.team("new").invited_emails()

    later = now + timedelta(days=2)  # past ends_at
    assert transfers_run(now=later).summary() == {"claimed": 1, "expired": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.EXPIRED
    new_fake = provider.state.team("new")
    assert lease.email not in new_fake.invited_emails() and lease.email not in new_fake.member_emails()
    assert lease.email not in provider.state.team("old").member_emails()
    assert lease.events.get(action=LeaseAction.EXPIRED).detail["withdrawn_from"] == "new"
