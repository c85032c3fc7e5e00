"""The transfer run's engine (``leases.services.transfer_run``): the common case recorded in
batches, provider calls shared out among the call threads, no lease waiting for another's call."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from leases.models import LeaseAction, LeaseStatus, MemberLease
from leases.services.transfers import transfers_run
from tests.faults import _h3_support as h3

pytestmark = pytest.mark.django_db(transaction=True)

provider = h3.provider  # the fake provider of tests/lease_fixtures.py, with gates


def _due(make_lease, provider, team) -> MemberLease:
    """An active lease whose term ended a minute ago, seated at the provider."""
    now = timezone.now()
    lease = make_lease(
        team, LeaseStatus.ACTIVE, joined_at=now - timedelta(days=31), expires_at=now - timedelta(minutes=1)
    )
    member_id = provider.state.team(team.name).add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    return lease


def _actions(lease: MemberLease) -> list[str]:
    return [a for a in lease.events.order_by("id").values_list("action", flat=True) if a != LeaseAction.NOTE]


def _statements_in_every_thread():
    """A context that counts SQL statements on every connection opened inside it (the run's call
    threads and claim keeper have their own): the benchmark's counter."""
    from benchmarks.leases_bench import counting_queries

    return counting_queries()


def test_a_run_records_its_leases_together_a_few_statements_per_lease(provider, make_team, make_lease, settings):
    """The common case is recorded in batches: 60 transfers between six teams cost a handful of
    statements each, all threads counted (the one-lease code took 25–31 per transfer, which
    capped a worker near 40 transfers per second of CPU). Every lease still walks its four events."""
    settings.LEASE_TRANSFER_CONCURRENCY = 4
    settings.LEASE_TRANSFER_BATCH_SIZE = 30
    teams = [make_team(f"t{n}", capacity=30) for n in range(6)]
    leases = [_due(make_lease, provider, teams[n % 6]) for n in range(60)]

    with _statements_in_every_thread() as statements:
        result = transfers_run()

    assert result.summary() == {"claimed": 60, "transferred": 60}
    per_lease = len(statements) / 60
    assert per_lease <= 8, f"{per_lease:.1f} statements per transferred lease"
    for lease in leases:
        assert _actions(lease) == ["transfer_started", "invited", "left_old_team", "transferred"]
        lease.refresh_from_db()
        assert lease.status == LeaseStatus.PENDING and lease.team_id != teams[leases.index(lease) % 6].pk


def test_one_slow_invite_does_not_hold_up_the_other_leases(provider, make_team, make_lease, settings):
    """While one lease's invite hangs at the provider, the run moves the others all the way: each
    lease walks its own steps; only the provider calls are shared out among the threads."""
    settings.LEASE_TRANSFER_CONCURRENCY = 3
    settings.LEASE_PROVIDER_TIMEOUT = 30
    slow_from, fast_from = make_team("slow-from", capacity=5, pool="slow"), make_team("fast-from", capacity=5)
    make_team("slow-to", capacity=5, pool="slow")
    make_team("fast-to", capacity=5)
    slow = _due(make_lease, provider, slow_from)
    fast = [_due(make_lease, provider, fast_from) for _ in range(4)]
    gate = provider.state.gate("POST", team="slow-to", path="invites")
    outcome = {}
    runner = threading.Thread(target=lambda: (outcome.update(result=transfers_run()), connection.close()))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while MemberLease.objects.filter(pk__in=[f.pk for f in fast], status=LeaseStatus.PENDING).count() < 4:
            assert time.monotonic() < deadline, "the other leases waited for the slow invite"
            time.sleep(0.05)
        assert gate.arrivals() == 1 and runner.is_alive()  # the slow invite is still held
    finally:
        gate.open()
        runner.join(30)
    assert outcome["result"].summary() == {"claimed": 5, "transferred": 5}
    slow.refresh_from_db()
    assert slow.status == LeaseStatus.PENDING and slow.team.name == "slow-to"


def test_leases_let_go_and_claimed_again_in_one_run_report_every_outcome(provider, make_team, make_lease, settings):
    """The only other team dies under the invites (402): each lease is let go for a retry at once,
    claimed again by the same run, finds no team left and fails — and the run reports both
    outcomes of every lease. (A lease let go by its one-lease job could be claimed again before
    the run had read that job's answer; the run then lost count of it and ended with the second
    attempts' outcomes missing.)"""
    settings.LEASE_TRANSFER_CONCURRENCY = 3
    settings.LEASE_TRANSFER_MAX_ATTEMPTS = 2
    settings.LEASE_TRANSFER_BACKOFF_SECONDS = 0
    old = make_team("old", capacity=3)
    make_team("dying", capacity=5)
    leases = [_due(make_lease, provider, old) for _ in range(3)]
    provider.state.die("dying", 402)
    # The three invites are held and answered together: their answers reach the run together too,
    # after every one-lease job has let its lease go.
    gate = provider.state.gate("POST", team="dying", path="invites", limit=3)
    done = {}
    runner = threading.Thread(target=lambda: (done.update(result=transfers_run()), connection.close()))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while gate.arrivals() < 3:
            assert time.monotonic() < deadline, "the three invites never arrived"
            time.sleep(0.02)
    finally:
        gate.open()
        runner.join(30)
    result = done["result"]

    outcomes = sorted((o.lease_id, o.outcome) for o in result.outcomes)
    assert outcomes == sorted([(lease.pk, "retry") for lease in leases] + [(lease.pk, "failed") for lease in leases])
    assert result.claimed == 6
    for lease in leases:
        lease.refresh_from_db()
        assert (lease.status, lease.team) == (LeaseStatus.FAILED, old)
