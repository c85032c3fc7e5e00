"""Fault family 6, lease half: PostgreSQL kills the worker's connections (``pg_terminate_backend``,
as a failover or an administrator does) while a transfer or a join sync is between its provider
call and its write. The work resumes on the next run; nothing is lost or done twice.

The worker's backends are found in ``pg_stat_activity``: this test database, not this process's.
"""

from __future__ import annotations

import time

import pytest

from leases.models import LeaseAction, LeaseStatus, MemberLease, TransferStep
from tests.faults import _h3_support as h3
from tests.faults import processes
from tests.faults._h3_support import (
    assert_capacity_respected,
    claims_lapsed,
    due_lease,
    other_backends,
    recount_seats,
    seats_of,
    send_run_transfers,
    terminate_backends,
)

pytestmark = pytest.mark.django_db(transaction=True)

# Fixtures of tests/faults/_h3_support.py (``provider`` is the gated one).
alerts = h3.alerts
provider = h3.provider
workers = h3.workers


def test_connections_killed_mid_transfer(provider, make_team, make_lease, workers):
    """Two leases in flight in one worker (two call threads, two pools): A is inside its invite
    POST, B inside its DELETE from the old team. Every connection of the worker is terminated, then
    the provider answers (and acts). The first write after the kill breaks and does not land; the
    run goes on with a new connection, so the other lease's answer is recorded and that lease
    finishes in this run. The next run completes the interrupted one: A's second invite is
    answered 409 (already invited: done), B's removal is done again (404 or 204) — one membership
    each, one ``transferred`` each."""
    old_a, new_a = make_team("old-a", capacity=1, pool="a"), make_team("new-a", capacity=1, pool="a")
    old_b, new_b = make_team("old-b", capacity=1, pool="b"), make_team("new-b", capacity=1, pool="b")
    a = due_lease(make_lease, provider, old_a, email="a@example.com")
    b = due_lease(make_lease, provider, old_b, email="b@example.com")
    gates = [provider.state.gate("POST", team="new-a", path="invites"), provider.state.gate("DELETE", team="old-b")]
    worker = workers.start(concurrency=1, LEASE_TRANSFER_CONCURRENCY="2")

    send_run_transfers()
    processes.wait_for(lambda: all(g.arrivals() for g in gates), timeout=30, what="invite and removal held")
    backends = other_backends()
    assert backends, "the worker has no connection to terminate"
    assert terminate_backends(backends) == len(backends)
    killed_at = time.monotonic()
    for gate in gates:
        gate.open()
    processes.wait_for(
        lambda: (
            "leases.run_transfers" in workers.log(0) and ("retry:" in workers.log(0) or "succeeded" in workers.log(0))
        ),
        timeout=30,
        what="the interrupted run to end",
    )
    assert worker.poll() is None
    a.refresh_from_db()
    b.refresh_from_db()
    # Each lease is either where its last record before the kill left it, or finished; the write
    # the kill broke did not land, so at least one of them is not finished.
    a_interrupted = (a.status, a.transfer_step) == (LeaseStatus.TRANSFERRING, TransferStep.NONE)
    b_interrupted = (b.status, b.transfer_step) == (LeaseStatus.TRANSFERRING, TransferStep.INVITED)
    assert a_interrupted or (a.status, a.team) == (LeaseStatus.PENDING, new_a), (a.status, a.transfer_step)
    assert b_interrupted or (b.status, b.team) == (LeaseStatus.PENDING, new_b), (b.status, b.transfer_step)
    assert a_interrupted or b_interrupted

    processes.wait_for(lambda: claims_lapsed([a.pk, b.pk]), timeout=30, what="the claims to be free")
    send_run_transfers()
    processes.wait_for(
        lambda: MemberLease.objects.filter(pk__in=[a.pk, b.pk], status=LeaseStatus.PENDING).count() == 2,
        timeout=30,
        what="the resumed transfers",
    )
    print(f"recovery after pg_terminate_backend mid-transfer: {time.monotonic() - killed_at:.1f} s")
    for lease, old, new in ((a, old_a, new_a), (b, old_b, new_b)):
        lease.refresh_from_db()
        assert lease.team == new
        assert lease.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
        assert lease.events.filter(action=LeaseAction.LEFT_OLD_TEAM).count() == 1
        assert seats_of(provider, lease.email, [old, new]) == [new.name]
    # An interrupted A was invited again (answered 409: one invite); a finished A only once.
    assert provider.state.posts("new-a", a.email) == (2 if a_interrupted else 1)
    assert provider.state.posts("new-b", b.email) == 1  # B's invite was recorded before the fault
    assert_capacity_respected(provider, [old_a, new_a, old_b, new_b])


def test_connections_killed_mid_join_sync(provider, make_team, make_lease, workers):
    """Three pending leases whose members have joined; the join sync's listing is held at the
    provider, every connection of the worker is terminated, then the listing answers. The sync
    cannot write; the next sync activates all three, each once, without inviting anyone again."""
    alpha = make_team("alpha", capacity=5)
    leases = [make_lease(alpha, LeaseStatus.PENDING) for _ in range(3)]
    recount_seats()
    for lease in leases:
        provider.state.team("alpha").add_member(lease.email)
    ids = [lease.pk for lease in leases]
    gate = provider.state.gate("GET", team="alpha", path="members")
    worker = workers.start(concurrency=1)

    from leases.tasks import sync_joins

    sync_joins.delay()
    processes.wait_for(gate.arrivals, timeout=30, what="the members listing held")
    backends = other_backends()
    assert backends and terminate_backends(backends) == len(backends)
    killed_at = time.monotonic()
    gate.open()
    processes.wait_for(
        lambda: "leases.sync_joins" in workers.log(0) and ("retry:" in workers.log(0) or "succeeded" in workers.log(0)),
        timeout=30,
        what="the interrupted sync to end",
    )
    assert worker.poll() is None
    assert MemberLease.objects.filter(pk__in=ids, status=LeaseStatus.PENDING).count() == 3

    sync_joins.delay()  # the next run (beat sends one every 5 minutes)
    processes.wait_for(
        lambda: MemberLease.objects.filter(pk__in=ids, status=LeaseStatus.ACTIVE).count() == 3,
        timeout=30,
        what="the next sync to activate the leases",
    )
    print(f"recovery after pg_terminate_backend mid-sync: {time.monotonic() - killed_at:.1f} s")
    for lease in leases:
        assert lease.events.filter(action=LeaseAction.JOINED).count() == 1
        assert provider.state.posts("alpha", lease.email) == 0
        assert seats_of(provider, lease.email, [alpha]) == ["alpha"]
