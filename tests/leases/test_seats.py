"""Seats counted in constant time (``Team.seats_taken``) and taken by locking only the chosen team.

The counter has one writer, the transition function; these tests check it against a recount of the
leases after each kind of change, that nothing else overwrites it, that the migration fills it, that
a drift is found and repaired, and — with real threads on PostgreSQL — that redemptions, transfers
and a join sync racing for the last seats never seat anyone twice nor fill a team over capacity.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, Team
from leases.providers import TransientProviderError
from leases.selectors import team_free_seats, teams_seat_drift, teams_seat_recount
from leases.services.cancellation import lease_cancel
from leases.services.orphans import orphans_check
from leases.services.redemption import redeem
from leases.services.sync import joins_sync
from leases.services.transfers import transfers_run
from leases.services.transitions import TeamFullError, lease_open, teams_lock, teams_seats_recount

pytestmark = pytest.mark.django_db


def counters() -> dict[str, int]:
    return dict(Team.objects.values_list("name", "seats_taken"))


def recount() -> dict[str, int]:
    names = dict(Team.objects.values_list("pk", "name"))
    counted = teams_seat_recount()
    return {name: counted.get(pk, 0) for pk, name in names.items()}


def assert_counters_match() -> None:
    assert counters() == recount()
    assert teams_seat_drift() == {}


def due_lease(make_lease, provider, team: Team, **kwargs) -> MemberLease:
    """An active lease, seated at the provider, whose term ended a minute ago."""
    now = timezone.now()
    lease = make_lease(team, LeaseStatus.ACTIVE, expires_at=now - timedelta(minutes=1), **kwargs)
    member_id = provider.state.team(team.name).add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    return lease


# -- the counter follows every kind of change ------------------------------------------------------------
def test_redemption_cancel_transfer_and_expiry_move_the_counter(provider, make_team, make_lease, make_code):
    alpha, beta = make_team("alpha", capacity=2), make_team("beta", capacity=2)
    lease = redeem(code=make_code().code, email="one@example.com")
    assert counters() == {"alpha": 1, "beta": 0} or counters() == {"alpha": 0, "beta": 1}
    assert_counters_match()

    lease_cancel(lease_id=lease.pk, reason="test")
    assert counters() == {"alpha": 0, "beta": 0}

    moving = due_lease(make_lease, provider, alpha)
    assert counters() == {"alpha": 1, "beta": 0}
    transfers_run()
    moving.refresh_from_db()
    assert (moving.status, moving.team_id) == (LeaseStatus.PENDING, beta.pk)
    assert counters() == {"alpha": 0, "beta": 1}  # the old seat freed, the reserved one now held

    ending = due_lease(make_lease, provider, alpha, ends_at=timezone.now() - timedelta(minutes=1), total_months=1)
    transfers_run()
    ending.refresh_from_db()
    assert ending.status == LeaseStatus.EXPIRED
    assert counters() == {"alpha": 0, "beta": 1}
    assert_counters_match()


def test_a_transfer_reserves_its_target_seat_while_it_moves(provider, make_team, make_lease):
    alpha, beta = make_team("alpha", capacity=2), make_team("beta", capacity=1)
    lease = due_lease(make_lease, provider, alpha)
    # The removal from alpha fails (transient): the lease stays transferring, its invite sent.
    provider.state.team("alpha").fail_next.extend([TransientProviderError("down", status=503)] * 3)
    transfers_run()
    lease.refresh_from_db()
    assert (lease.status, lease.transfer_team_id) == (LeaseStatus.TRANSFERRING, beta.pk)
    assert counters() == {"alpha": 1, "beta": 1}  # beta's only seat is reserved for it
    assert team_free_seats(Team.objects.get(pk=beta.pk)) == 0
    assert_counters_match()


def test_a_full_team_refuses_the_take_and_nothing_is_written(provider, make_team, make_lease):
    team = make_team("alpha", capacity=1)
    make_lease(team, LeaseStatus.ACTIVE)
    events = LeaseEvent.objects.count()
    with pytest.raises(TeamFullError):
        lease_open(
            team=team, event={"action": LeaseAction.NOTE}, now=timezone.now(), email="x@example.com", term_months=1
        )
    assert not MemberLease.objects.filter(email="x@example.com").exists()
    assert LeaseEvent.objects.count() == events
    assert counters() == {"alpha": 1}


# -- nothing else writes it ------------------------------------------------------------------------------
def test_saving_a_loaded_team_never_overwrites_the_counter(provider, make_team, make_lease):
    """Regression: a Team loaded before seats were taken and saved afterwards (an operator's edit
    in the admin) wrote its stale ``seats_taken`` back — the counter said 0 seats with 2 held,
    and the next drain seated two leases too many."""
    team = make_team("alpha", capacity=2)
    for _ in range(2):
        make_lease(team, LeaseStatus.ACTIVE)
    assert team.seats_taken == 0  # the object in memory is stale
    team.capacity = 3
    team.save()
    assert counters() == {"alpha": 2}
    assert Team.objects.get(pk=team.pk).capacity == 3


def test_a_capacity_lowered_below_the_seats_taken_takes_nobody_until_back_under(
    provider, make_team, make_lease, make_code
):
    team = make_team("alpha", capacity=3)
    for _ in range(3):
        make_lease(team, LeaseStatus.ACTIVE)
    team.capacity = 1  # allowed: the members are seated; the team is over-full, not broken
    team.save()
    assert counters() == {"alpha": 3}
    assert redeem(code=make_code().code, email="late@example.com").status == LeaseStatus.WAITING
    assert counters() == {"alpha": 3}
    assert_counters_match()


# -- the migration fills it ------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_the_migration_counts_the_existing_leases():
    executor = MigrationExecutor(connection)
    executor.migrate([("leases", "0005_waiting_list_renewals_pools")])
    old = executor.loader.project_state([("leases", "0005_waiting_list_renewals_pools")]).apps
    team_model, lease_model = old.get_model("leases", "Team"), old.get_model("leases", "MemberLease")
    a = team_model.objects.create(name="a", provider="memory", capacity=5)
    b = team_model.objects.create(name="b", provider="memory", capacity=5)
    team_model.objects.create(name="empty", provider="memory", capacity=5)
    now = timezone.now()
    seated = {"joined_at": now - timedelta(days=3), "expires_at": now + timedelta(days=3)}
    for n, status in enumerate(["pending", "active", "failed", "expired", "cancelled"]):
        extra = seated if status not in ("pending",) else {}
        lease_model.objects.create(email=f"a{n}@x.io", team=a, term_months=1, status=status, **extra)
    lease_model.objects.create(email="w@x.io", team=None, term_months=1, status="waiting")
    lease_model.objects.create(email="m@x.io", team=a, transfer_team=b, term_months=1, status="transferring", **seated)
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    # alpha: pending, active, failed, transferring; beta: the transfer's reserved seat.
    assert counters() == {"a": 4, "b": 1, "empty": 0}
    assert_counters_match()


# -- the consistency check -------------------------------------------------------------------------------
def test_the_orphan_check_reports_and_repairs_a_drifted_counter(provider, make_team, make_lease):
    team = make_team("alpha", capacity=5)
    make_lease(team, LeaseStatus.ACTIVE)
    Team.objects.filter(pk=team.pk).update(seats_taken=4)  # a bug, or a write behind the engine's back
    assert teams_seat_drift() == {"alpha": (4, 1)}
    report = orphans_check(alert=False)
    assert report.seat_drift == {"alpha": (4, 1)}
    assert "alpha" in report.as_text()
    assert counters() == {"alpha": 1}
    assert orphans_check(alert=False).seat_drift == {}


def test_recount_is_exact_and_idempotent(provider, make_team, make_lease):
    alpha, beta = make_team("alpha"), make_team("beta")
    make_lease(alpha, LeaseStatus.TRANSFERRING, transfer_team=beta)
    Team.objects.update(seats_taken=0)
    assert teams_seats_recount() == {"alpha": (0, 1), "beta": (0, 1)}
    assert teams_seats_recount() == {}


# -- races on PostgreSQL ---------------------------------------------------------------------------------
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks are PostgreSQL's; SQLite serializes writers anyway")


def _in_threads(target, args_list: list[tuple]) -> list[BaseException]:
    barrier = threading.Barrier(len(args_list))
    errors: list[BaseException] = []

    def run(*args: object) -> None:
        try:
            barrier.wait()
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=args) for args in args_list]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    return errors


@pytest.mark.django_db(transaction=True)
def test_redemptions_racing_for_the_last_seats_fill_each_team_exactly(provider, make_team, make_code):
    """24 customers redeem at the same moment (threads, own connections) into two teams with five
    seats between them: exactly five are seated, each team to its capacity, the rest wait."""
    _postgresql_only()
    make_team("alpha", capacity=2)
    make_team("beta", capacity=3)
    codes = [make_code().code for _ in range(24)]
    errors = _in_threads(lambda n: redeem(code=codes[n], email=f"rush{n}@example.com"), [(n,) for n in range(24)])
    assert errors == []
    statuses = Counter(MemberLease.objects.values_list("status", flat=True))
    assert statuses == Counter({LeaseStatus.PENDING: 5, LeaseStatus.WAITING: 19})
    held = Counter(MemberLease.objects.filter(status=LeaseStatus.PENDING).values_list("team__name", flat=True))
    assert held == Counter({"alpha": 2, "beta": 3})
    assert counters() == {"alpha": 2, "beta": 3}
    for name, capacity in (("alpha", 2), ("beta", 3)):
        fake = provider.state.team(name)
        assert len(fake.invited_emails()) == capacity  # one invite per seated customer, none more


@pytest.mark.django_db(transaction=True)
def test_transfers_and_redemptions_racing_for_the_last_seats_never_overfill(
    provider, make_team, make_lease, make_code, settings
):
    """Three transfer runs (4 threads each) and six redemptions at once: 12 due leases in two full
    teams compete with the redemptions for the 4 free seats of a third team and the seats the
    others free. Nobody is seated twice, no team ever holds more than its capacity, every move is
    one invite and one ``transferred`` event, and the counters equal a recount."""
    _postgresql_only()
    settings.LEASE_TRANSFER_CONCURRENCY = 4
    settings.LEASE_TRANSFER_BATCH_SIZE = 3
    alpha, beta = make_team("alpha", capacity=6), make_team("beta", capacity=6)
    make_team("gamma", capacity=4)
    moving = [due_lease(make_lease, provider, team) for team in (alpha, beta) for _ in range(6)]
    came_from = {lease.pk: lease.team_id for lease in moving}
    codes = [make_code().code for _ in range(6)]

    def work(kind: str, n: int) -> None:
        if kind == "run":
            transfers_run()
        else:
            redeem(code=codes[n], email=f"new{n}@example.com")

    errors = _in_threads(work, [("run", n) for n in range(3)] + [("redeem", n) for n in range(6)])
    assert errors == []

    assert_counters_match()
    capacity = dict(Team.objects.values_list("name", "capacity"))
    for name, held in recount().items():
        assert held <= capacity[name], f"team {name} holds {held} of {capacity[name]}"
        fake = provider.state.team(name)
        assert len(fake.member_emails() | fake.invited_emails()) <= capacity[name]
    transferred = Counter(LeaseEvent.objects.filter(action=LeaseAction.TRANSFERRED).values_list("lease_id", flat=True))
    assert set(transferred.values()) <= {1}
    for lease in moving:
        lease.refresh_from_db()
        if transferred[lease.pk]:
            assert lease.status == LeaseStatus.PENDING and lease.team_id != came_from[lease.pk]
        else:  # no seat anywhere when it tried: it waits for its retry, holding only its old seat
            assert lease.status in (LeaseStatus.ACTIVE, LeaseStatus.TRANSFERRING)
    posts = Counter(email for fake in provider.state.teams.values() for email in fake.invite_posts)
    assert max(posts.values()) == 1  # one invite per email, whoever won which seat
    assert recount()["gamma"] == 4  # more contenders than seats: every free seat was taken, once


@pytest.mark.django_db(transaction=True)
def test_locking_teams_does_not_block_a_lease_written_into_one_of_them(make_team, make_lease):
    """``teams_lock`` takes the lock an UPDATE of the counter takes (``FOR NO KEY UPDATE``), not
    ``FOR UPDATE``: the latter also blocks the foreign-key check (``FOR KEY SHARE``) of a lease
    written into the team. Two transfer runs deadlocked on that — one locking the teams of its
    batch, the other writing its moved leases into one of them while holding another team's row
    (found by the benchmark: 2 runs in 3 lost a batch to "deadlock detected")."""
    _postgresql_only()
    alpha, beta = make_team("alpha", capacity=5), make_team("beta", capacity=5)
    lease = make_lease(alpha, LeaseStatus.ACTIVE)
    locked, release = threading.Event(), threading.Event()

    def hold_both_teams() -> None:
        with transaction.atomic():
            teams_lock([alpha.pk, beta.pk])
            locked.set()
            release.wait(30)

    errors = []
    holder = threading.Thread(target=lambda: (_run_or_keep(hold_both_teams, errors), connection.close()))
    holder.start()
    try:
        assert locked.wait(30)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            # The foreign-key check of this write must not wait for the holder.
            MemberLease.objects.filter(pk=lease.pk).update(team=beta)
    finally:
        release.set()
        holder.join(30)
    assert errors == []
    assert MemberLease.objects.get(pk=lease.pk).team_id == beta.pk


def _run_or_keep(work, errors: list[BaseException]) -> None:
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


@pytest.mark.django_db(transaction=True)
def test_two_transfer_runs_over_many_teams_move_every_lease_without_a_database_error(
    provider, make_team, make_lease, settings
):
    """Two runs at once (4 call threads each) move 120 leases between 8 teams: every lease is
    transferred exactly once and no run loses a batch to a lock error."""
    _postgresql_only()
    settings.LEASE_TRANSFER_CONCURRENCY = 4
    settings.LEASE_TRANSFER_BATCH_SIZE = 12
    teams = [make_team(f"t{n}", capacity=40) for n in range(8)]
    moving = [due_lease(make_lease, provider, teams[n % 8]) for n in range(120)]
    results = []
    errors = _in_threads(lambda: results.append(transfers_run()), [(), ()])
    assert errors == []
    outcomes = Counter(o.outcome for result in results for o in result.outcomes)
    assert outcomes == Counter({"transferred": 120}), [
        o for r in results for o in r.outcomes if o.outcome != "transferred"
    ]
    assert MemberLease.objects.filter(pk__in=[lease.pk for lease in moving], status=LeaseStatus.PENDING).count() == 120
    assert_counters_match()


# -- the join sync in parallel ---------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_parallel_join_sync_settles_every_team_and_drains_the_queue_once(
    provider, make_team, make_lease, settings, monkeypatch
):
    _postgresql_only()
    settings.LEASE_SYNC_CONCURRENCY = 3
    teams = [make_team(f"t{n}", capacity=5) for n in range(6)]
    joined = []
    for team in teams:
        for index in range(4):
            lease = make_lease(team, LeaseStatus.PENDING)
            if index % 2 == 0:
                provider.state.team(team.name).add_member(lease.email)
                joined.append(lease.pk)
            else:
                provider.state.team(team.name).invite(lease.email)

    import leases.services.sync as sync_module
    import leases.services.waiting as waiting_module

    threads_used: set[int] = set()
    drains: list[str | None] = []
    real_sync, real_drain = sync_module.team_sync_joins, waiting_module.waiting_drain

    def spy_sync(**kwargs):
        threads_used.add(threading.get_ident())
        return real_sync(**kwargs)

    def spy_drain(**kwargs):
        drains.append(kwargs.get("pool"))
        return real_drain(**kwargs)

    monkeypatch.setattr(sync_module, "team_sync_joins", spy_sync)
    monkeypatch.setattr(waiting_module, "waiting_drain", spy_drain)
    results = joins_sync()

    assert [r.team for r in results] == [t.name for t in teams]  # in the teams' order
    assert all(r.ok for r in results) and sum(r.joined for r in results) == len(joined)
    assert set(MemberLease.objects.filter(status=LeaseStatus.ACTIVE).values_list("pk", flat=True)) == set(joined)
    assert len(threads_used) > 1  # the teams really ran on several threads
    assert drains == [None]  # the waiting list drained once, after every team
    assert_counters_match()


@pytest.mark.django_db(transaction=True)
def test_a_parallel_join_sync_keeps_the_per_host_rate_limit(provider, make_team, make_lease, settings):
    """Four teams on one provider host, synced by four threads: together they never send more
    than ``LEASE_PROVIDER_RATE_LIMIT`` requests in any one-second window (the limiter is per host,
    shared by every thread and process)."""
    _postgresql_only()
    settings.LEASE_SYNC_CONCURRENCY = 4
    settings.LEASE_PROVIDER_RATE_LIMIT = 8
    settings.LEASE_PROVIDER_PAGE_SIZE = 2
    teams = [make_team(f"h{n}", capacity=10) for n in range(4)]
    for team in teams:
        for _ in range(8):  # 4 invite pages + 1 members page per team
            lease = make_lease(team, LeaseStatus.PENDING)
            provider.state.team(team.name).invite(lease.email)
    provider.state.request_times.clear()
    results = joins_sync()
    assert all(r.ok for r in results)
    times = sorted(provider.state.request_times)
    assert len(times) >= 16  # enough requests that a per-thread limit would have shown
    # Arrivals may trail their limiter slots by up to RATE_LIMIT_JITTER_ALLOWANCE (README, "Token
    # keep-alive" benchmark): windows that much shorter than a second hold at most the limit.
    window = 1.0 - settings.RATE_LIMIT_JITTER_ALLOWANCE
    busiest = max(sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times))
    assert busiest <= 8


def test_the_legacy_import_counts_the_seats_it_imports(tmp_path):
    """Imported leases are bulk-created: their teams' counters are recounted in the same
    transaction — over capacity too (the members are seated already; the import warns)."""
    from leases.services.legacy import legacy_db_import
    from tests.leases.test_legacy_import import make_team as make_legacy_team
    from tests.leases.test_legacy_import import write_legacy_db

    make_legacy_team("Gamma", capacity=1)
    columns = ("email", "team_name", "status", "start_at", "join_at", "expires_at")
    start, join, expires = 1767225600, 1767312000, 1775088000
    rows = [
        ("kim@example.com", "Gamma", "active", start, join, expires),
        ("lee@example.com", "Gamma", "awaiting_join", start, None, None),
    ]
    report = legacy_db_import(path=write_legacy_db(tmp_path / "old.sqlite3", rows, columns))
    assert report.imported == 2
    assert counters() == {"Gamma": 2}
    assert_counters_match()
