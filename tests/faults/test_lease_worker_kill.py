"""Fault family 1: ``kill -9`` of a worker between the invite into the next team and the removal
from the old one.

How the product recovers (read from the code, checked here): every task is ``acks_late`` with
``reject_on_worker_lost``, so the ``run_transfers`` message of a killed pool child goes back to the
queue and is redelivered at once — but that redelivery finds the leases still claimed by the dead
process (``claimed_until``), and takes nothing. The leases are resumed by the first
``run_transfers`` after the claim lapses (``LEASE_CLAIM_TTL``, 300 s by default; beat sends one
every 5 minutes, so up to TTL + 5 min in production). These tests set the TTL to its minimum
(10 s) and send that run themselves once the claims have lapsed, then check the resumed transfer
does not invite again (``transfer_step = invited`` was recorded before the removal).
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
    seats_of,
    send_run_transfers,
)

pytestmark = pytest.mark.django_db(transaction=True)

# Fixtures of tests/faults/_h3_support.py (``provider`` is the gated one).
alerts = h3.alerts
provider = h3.provider
workers = h3.workers


def _settled(lease_ids: list[int]) -> bool:
    return not MemberLease.objects.filter(pk__in=lease_ids).exclude(status=LeaseStatus.PENDING).exists()


def _check_moved_once(provider, leases, old_teams, new_teams) -> None:
    teams = [*old_teams, *new_teams]
    for lease in leases:
        old = lease.team
        lease.refresh_from_db()
        assert lease.status == LeaseStatus.PENDING and lease.team in new_teams, (lease.status, lease.team)
        assert lease.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
        assert lease.events.filter(action=LeaseAction.TRANSFER_STARTED).count() == 1
        # One invite POST at the provider, into the new team, for the whole life of the transfer.
        assert [provider.state.posts(t.name, lease.email) for t in teams].count(1) == 1
        assert sum(provider.state.posts(t.name, lease.email) for t in teams) == 1
        assert provider.state.posts(lease.team.name, lease.email) == 1
        # Seated in exactly one team: never two, never none.
        assert seats_of(provider, lease.email, teams) == [lease.team.name]
        assert old != lease.team
    assert_capacity_respected(provider, teams)


def test_kill9_of_a_pool_child_then_of_the_whole_worker_with_six_leases_in_flight(
    provider, make_team, make_lease, workers
):
    """Six leases in flight in one prefork worker: two pool children each run a ``run_transfers``
    (three leases, three threads), every lease held at its DELETE from its old team. At ``lost``
    the provider never acts on the held DELETEs; at ``done`` it removes the members after their
    callers died (the worker never learns it).

    1. ``kill -9`` of one pool child: the master lives on and starts a new child; the message of
       the dead child is redelivered (``acks_late`` + ``reject_on_worker_lost``) and finds its
       leases still claimed by the dead child: ``{'claimed': 0}``.
    2. ``kill -9`` of the whole worker (master and children), and a new worker started.
    3. Once the dead claims lapse, the next ``run_transfers`` completes every lease exactly once:
       one invite POST (into the new team), one ``transferred``, seated in one team, no team over
       capacity — and the removals done again (204 at ``lost``, 404 at ``done``: both are done).
    """
    olds = [make_team("lost", capacity=3), make_team("done", capacity=3)]
    news = [make_team("new0", capacity=4), make_team("new1", capacity=4)]
    leases = [due_lease(make_lease, provider, olds[n % 2]) for n in range(6)]
    ids = [lease.pk for lease in leases]
    gates = [provider.state.gate("DELETE", team="lost", discard=True), provider.state.gate("DELETE", team="done")]
    env = {"LEASE_TRANSFER_BATCH_SIZE": "3", "LEASE_TRANSFER_CONCURRENCY": "3"}
    first = workers.start(pool="prefork", concurrency=2, **env)
    children = processes.child_pids(first.pid)

    send_run_transfers()
    send_run_transfers()
    processes.wait_for(lambda: sum(g.arrivals() for g in gates) == 6, timeout=60, what="six removals held")
    assert MemberLease.objects.filter(pk__in=ids, transfer_step=TransferStep.INVITED).count() == 6
    owners = set(MemberLease.objects.filter(pk__in=ids).values_list("claimed_by", flat=True))
    assert len(owners) == 2 and "" not in owners, owners  # one claim owner per child

    processes.kill9(children[0])
    killed_at = time.monotonic()
    processes.wait_for(
        lambda: set(processes.child_pids(first.pid)) - set(children), timeout=30, what="a new pool child"
    )
    assert first.poll() is None  # the master lived on
    processes.wait_for(
        lambda: "{'claimed': 0}" in workers.log(0), timeout=30, what="the redelivered run to find the claims taken"
    )
    assert set(MemberLease.objects.filter(pk__in=ids).values_list("claimed_by", flat=True)) == owners

    for pid in [*processes.child_pids(first.pid), first.pid]:
        processes.kill9(pid)
    first.wait(10)
    for gate in gates:
        gate.open()  # the held DELETEs now answer dead sockets (those at "done" act)
    workers.start(pool="prefork", concurrency=2, **env)
    assert MemberLease.objects.filter(pk__in=ids, status=LeaseStatus.TRANSFERRING).count() == 6

    processes.wait_for(lambda: claims_lapsed(ids), timeout=30, what="the dead worker's claims to lapse")
    send_run_transfers()
    processes.wait_for(lambda: _settled(ids), timeout=60, what="the resumed transfers")
    print(f"recovery of 6 leases after kill -9: {time.monotonic() - killed_at:.1f} s with LEASE_CLAIM_TTL=10")

    _check_moved_once(provider, leases, olds, news)
    for lease in leases:
        lease.refresh_from_db()
        assert lease.transfer_step == TransferStep.NONE and not lease.claimed_by
    assert len(provider.state.deletes("lost")) == 3  # the discarded DELETEs never reached the fake
    assert len(provider.state.deletes("done")) == 6  # held ones acted, resumed ones answered 404
