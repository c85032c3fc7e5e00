"""Fault family 7: what can happen to a transfer while it is between its provider calls.

- A team dies (its provider starts answering 402 or 401) while leases are in flight to it, or
  from it: the leases end in a healthy team, or ``failed`` with a reason and the member still
  seated where they were; the team is marked dead once (one event, one alert).
- An operator cancels (the service, the admin action) while a worker is inside a provider call:
  the lease ends cancelled, no seat left taken at the provider or in the seat counter.
- A claim outlives its lease: the worker holding it is frozen (SIGSTOP) past ``LEASE_CLAIM_TTL``,
  a second worker takes the lease over and finishes it; the first, thawed, finds its claim lost
  and writes nothing.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from django.db import connection

from leases.models import LeaseAction, LeaseStatus, MemberLease, TeamAction, TeamEvent, TeamHealth
from leases.services.transfers import transfers_run
from tests.faults import _h3_support as h3
from tests.faults import processes
from tests.faults._h3_support import (
    actions,
    assert_capacity_respected,
    claims_lapsed,
    due_lease,
    seats_of,
    send_run_transfers,
)
from tests.leases.test_races import _cancel_through_the_admin, _cancel_through_the_service

pytestmark = pytest.mark.django_db(transaction=True)

# Fixtures of tests/faults/_h3_support.py (``provider`` is the gated one).
alerts = h3.alerts
provider = h3.provider
workers = h3.workers


@pytest.fixture
def fast_transfers(settings, alerts):
    settings.LEASE_TRANSFER_CONCURRENCY = 3
    settings.LEASE_TRANSFER_BACKOFF_SECONDS = 0
    settings.LEASE_TRANSFER_MAX_ATTEMPTS = 2
    settings.LEASE_PROVIDER_TIMEOUT = 30
    settings.NOTIFY_URLS = [alerts.notify_url]
    return settings


def _run_in_thread() -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(transfers_run())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _dead_events(team) -> int:
    return TeamEvent.objects.filter(team=team, action=TeamAction.HEALTH_CHANGED, to_health=TeamHealth.DEAD).count()


@pytest.mark.parametrize("spare", ["healthy-team-left", "no-team-left"])
def test_target_team_dies_with_three_invites_in_flight(provider, make_team, make_lease, fast_transfers, alerts, spare):
    """Three leases move at once (three threads); all three invites into ``dying`` are held at the
    provider, which then answers them 402 (workspace deactivated) and everything after. ``dying``
    is marked dead once, with one alert. With another team free, every lease goes there at once;
    with none, every lease ends ``failed``, its reason saying so and where the member still is."""
    old = make_team("old", capacity=3)
    dying = make_team("dying", capacity=5)  # the most free seats: every lease picks it first
    teams = [old, dying]
    if spare == "healthy-team-left":
        teams.append(make_team("spare", capacity=3))
    leases = [due_lease(make_lease, provider, old) for _ in range(3)]
    gate = provider.state.gate("POST", team="dying", path="invites", limit=3)

    thread, out = _run_in_thread()
    try:
        processes.wait_for(lambda: gate.arrivals() == 3, timeout=30, what="three invites into the dying team")
        provider.state.die("dying", 402)
    finally:
        gate.open()
        thread.join(60)
    assert not thread.is_alive()
    [result] = out
    assert not isinstance(result, BaseException), result

    dying.refresh_from_db()
    assert dying.health == TeamHealth.DEAD
    assert _dead_events(dying) == 1
    dying_alerts = [t for t in alerts.titles() if "dying" in t]
    assert len(dying_alerts) == 1, alerts.titles()
    for lease in leases:
        lease.refresh_from_db()
        assert seats_of(provider, lease.email, teams) == ["spare" if spare == "healthy-team-left" else "old"]
        assert lease.events.filter(action=LeaseAction.TRANSFER_RETRY, detail__failed_team="dying").count() == 1
        if spare == "healthy-team-left":
            assert (lease.status, lease.team.name) == (LeaseStatus.PENDING, "spare")
            assert lease.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
        else:
            assert (lease.status, lease.team.name) == (LeaseStatus.FAILED, "old")
            assert "old" in lease.last_error and lease.last_error, lease.last_error
            assert LeaseAction.TRANSFERRED not in actions(lease)
            assert len([t for t in alerts.titles() if lease.email in t]) == 1  # one "transfer failed" alert
    expected = {"claimed": 6, "transferred": 3, "retry": 3} if spare == "healthy-team-left" else None
    if expected:
        assert result.summary() == expected
    else:
        assert result.count("failed") == 3, [(o.lease_id, o.outcome, o.detail[:60]) for o in result.outcomes]
    assert_capacity_respected(provider, teams)


def test_old_team_dies_during_the_removals(provider, make_team, make_lease, fast_transfers, alerts):
    """Two leases are inside their DELETE from ``old`` when its credentials are revoked (401 from
    then on); a third lease of ``old`` was not due. ``old`` is marked dead once (one alert); the
    two removals are recorded as skipped and the leases transferred; the third is evacuated in the
    same run, without a call to the dead team."""
    old, new = make_team("old", capacity=3), make_team("new", capacity=3)
    due = [due_lease(make_lease, provider, old) for _ in range(2)]
    not_due = due_lease(make_lease, provider, old, expires_at=due[0].expires_at.replace(year=2099))
    gate = provider.state.gate("DELETE", team="old", limit=2)

    thread, out = _run_in_thread()
    try:
        processes.wait_for(lambda: gate.arrivals() == 2, timeout=30, what="two removals from the old team")
        provider.state.die("old", 401)
    finally:
        gate.open()
        thread.join(60)
    [result] = out
    assert result.summary() == {"claimed": 3, "transferred": 3}, result.outcomes

    old.refresh_from_db()
    assert old.health == TeamHealth.DEAD and _dead_events(old) == 1
    assert len([t for t in alerts.titles() if "old" in t]) == 1, alerts.titles()
    assert len(provider.state.deletes("old")) == 2  # the evacuation did not call the dead team
    for lease in [*due, not_due]:
        lease.refresh_from_db()
        assert (lease.status, lease.team) == (LeaseStatus.PENDING, new)
        assert lease.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
        [left] = lease.events.filter(action=LeaseAction.LEFT_OLD_TEAM)
        assert "dead" in left.detail.get("skipped", ""), left.detail
        assert provider.state.posts("new", lease.email) == 1
        assert "new" in seats_of(provider, lease.email, [new])
    assert_capacity_respected(provider, [new])


@pytest.mark.parametrize(
    ("moment", "cancel"),
    [("invite", _cancel_through_the_service), ("removal", _cancel_through_the_admin)],
    ids=["invite-service", "removal-admin"],
)
def test_operator_cancels_while_a_worker_is_inside_a_provider_call(
    provider, make_team, make_lease, workers, admin_user, moment, cancel
):
    """A worker holds the lease and waits for the provider (its invite into ``new``, or its
    removal from ``old``); an operator cancels. The cancel is left as a request (the worker holds
    the lease) and the worker honours it: the lease ends cancelled, once; the member is in no team
    and invited to none; no seat stays counted. A cancel during the removal comes after the move
    is recorded: the lease is then cancelled in ``new`` by the same run."""
    old, new = make_team("old", capacity=1), make_team("new", capacity=1)
    lease = due_lease(make_lease, provider, old)
    gate = (
        provider.state.gate("POST", team="new", path="invites")
        if moment == "invite"
        else provider.state.gate("DELETE", team="old")
    )
    workers.start(concurrency=1)
    send_run_transfers()
    processes.wait_for(gate.arrivals, timeout=30, what=f"the worker inside its {moment}")
    try:
        assert cancel(lease, admin_user) == "requested"
    finally:
        gate.open()
    # The lease turns cancelled first, then its seats are freed: wait for the worker to say it is done.
    processes.wait_for(lambda: f"transfer lease={lease.pk} cancelled" in workers.log(0), timeout=30, what="the cancel")
    lease.refresh_from_db()
    assert (lease.claimed_by, lease.claimed_until, lease.cancel_requested_at) == ("", None, None)
    steps = actions(lease)
    assert steps.count(LeaseAction.CANCELLED) == 1, steps
    assert steps.index(LeaseAction.CANCEL_REQUESTED) < steps.index(LeaseAction.CANCELLED), steps
    if moment == "invite":
        assert LeaseAction.TRANSFERRED not in steps, steps
    else:
        assert steps.index(LeaseAction.TRANSFERRED) < steps.index(LeaseAction.CANCELLED), steps
    assert seats_of(provider, lease.email, [old, new]) == []
    assert provider.state.posts("new", lease.email) == 1
    for team in (old, new):
        team.refresh_from_db()
        assert getattr(team, "seats_taken", 0) == 0, team.name
    assert_capacity_respected(provider, [old, new])


def test_a_claim_outliving_its_worker_is_finished_once(provider, make_team, make_lease, workers):
    """Worker A is frozen (SIGSTOP, master and child: its claim heartbeat too) inside its removal
    from ``old``. Its claim lapses; worker B takes the lease over and finishes the move. A is
    thawed: its removal answers 404, its next write finds the claim lost (``stale``) and changes
    nothing. One invite, one removal that acted, one ``transferred``."""
    old, new = make_team("old", capacity=1), make_team("new", capacity=1)
    lease = due_lease(make_lease, provider, old)
    gate = provider.state.gate("DELETE", team="old", limit=1)  # only A's removal waits
    a = workers.start(concurrency=1)
    send_run_transfers()
    processes.wait_for(gate.arrivals, timeout=30, what="worker A inside its removal")
    frozen = [*processes.child_pids(a.pid), a.pid]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        lease.refresh_from_db()
        a_claim = lease.claimed_by
        processes.wait_for(lambda: claims_lapsed([lease.pk]), timeout=30, what="A's claim to lapse")
        workers.start(concurrency=1)  # worker B
        send_run_transfers()
        processes.wait_for(
            lambda: MemberLease.objects.get(pk=lease.pk).status == LeaseStatus.PENDING, timeout=30, what="B's move"
        )
        gate.open()  # A's removal reaches the provider: the member is gone already (404)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    processes.wait_for(lambda: f"transfer lease={lease.pk} stale" in workers.log(0), timeout=30, what="A stale")

    lease.refresh_from_db()
    assert lease.team == new and lease.status == LeaseStatus.PENDING and lease.claimed_by != a_claim
    steps = actions(lease)
    assert steps.count(LeaseAction.TRANSFERRED) == 1 and steps.count(LeaseAction.LEFT_OLD_TEAM) == 1, steps
    assert steps.count(LeaseAction.INVITED) == 1, steps
    assert provider.state.posts("new", lease.email) == 1
    assert len(provider.state.deletes("old")) == 2  # B's removal acted, A's answered 404
    assert seats_of(provider, lease.email, [old, new]) == ["new"]
    assert_capacity_respected(provider, [old, new])
