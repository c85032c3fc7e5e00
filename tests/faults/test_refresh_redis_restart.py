"""Fault family 6, the token half: Redis restarted mid-run, PostgreSQL connections killed mid-refresh.

**Redis.** A ``redis-server`` of this test's own (nothing persisted) is the broker and the shared
rate limiter of two real workers. Mid-run it is shut down (``SHUTDOWN NOSAVE``) and started again:
the queued batch messages and the limiter's state are gone. The sweeper (run here, as beat would)
sends the lost batches again; the run completes, every token recorded exactly once, none deleted,
and the upstream never sees more than the limit in any one second — before, across and after the
restart.

**PostgreSQL.** While both workers are inside a batch (their answers held at a gate), every
connection of theirs is terminated (``pg_terminate_backend``). The batches in hand fail on their
next query and are retried; their claims expire and the sweeper sends them again. The run
completes, every token recorded exactly once, none lost.
"""

from __future__ import annotations

import pytest
from django.db import connection

from tests.conftest import ok
from tests.faults import processes
from tests.faults._h4_support import (
    Gate,
    fingerprints,
    latest_run,
    make_tokens,
    private_redis_fixture,  # noqa: F401 - the fixture
    recorded_checks,
    send_task,
    wait_run_final,
    worker_env,
    workers_fixture,  # noqa: F401 - the fixture
)
from tokens.models import BatchStatus, RefreshBatch, RunStatus
from tokens.services.sweeper import refresh_runs_sweep
from tokens.tasks import sweep_runs

pytestmark = pytest.mark.django_db(transaction=True)

RATE = 20


@pytest.fixture
def fast_sweeper(settings) -> None:
    settings.BAOMING_RUN_LOCK_TTL = 10
    settings.BAOMING_SWEEP_GRACE_SECONDS = 10


def max_in_any_second(times: list[float]) -> int:
    times, best, start = sorted(times), 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_redis_restarted_mid_run_the_run_completes_under_the_limit(upstream, workers, private_redis, fast_sweeper):
    tokens = make_tokens(60)
    before = fingerprints()
    broker = private_redis.url(0)
    env = worker_env(
        upstream.url,
        CELERY_BROKER_URL=broker,
        REDIS_URL=private_redis.url(1),
        BAOMING_RATE_LIMIT=str(RATE),
        BAOMING_BATCH_SIZE="5",
        BAOMING_CONCURRENCY="4",
    )
    workers.start(2, env)
    send_task("tokens.refresh_tokens", broker_url=broker)
    processes.wait_for(lambda: len(upstream.requests) >= 20, timeout=60, what="the run under way")
    private_redis.restart()
    at_restart = len(upstream.requests)

    def sweep() -> None:  # beat's sweeper, sending to the restarted broker
        refresh_runs_sweep(
            dispatch=lambda batch_id: send_task(
                "tokens.refresh_batch", broker_url=broker, kwargs={"batch_id": batch_id}
            )
        )

    run = wait_run_final(timeout=90, tick=sweep)
    assert at_restart < 60, "the restart came after the run: it would prove nothing"
    assert run.status == RunStatus.SUCCEEDED, (run.status, run.error)
    assert run.total == 60 and run.deleted == 0
    checks = recorded_checks(run.pk)
    assert len(checks) == 60 and set(checks.values()) == {1}  # nothing lost, nothing doubled
    assert fingerprints() == before
    # A check whose limiter call failed while Redis was down is counted as a failure, not lost.
    assert run.ok + run.failed == 60
    assert all(upstream.calls_for(t.token) <= 2 for t in tokens)
    most = max_in_any_second([r["at"] for r in upstream.requests])
    # The restarted Redis has lost the limiter's schedule; its first reservations wait out the
    # slots handed out before the restart (leasesite.ratelimit.EPOCH_KEY), so no second holds more.
    assert most <= RATE


def test_postgresql_connections_killed_mid_refresh_the_run_completes(upstream, workers, fast_sweeper):
    gate = Gate()
    tokens = make_tokens(12)
    before = fingerprints()
    for token in tokens:
        upstream.answers[token.token] = gate.answer(ok)
    workers.start(2, worker_env(upstream.url, BAOMING_BATCH_SIZE="3", BAOMING_CONCURRENCY="4"))
    from tokens.tasks import refresh_tokens

    refresh_tokens.delay()
    processes.wait_for(lambda: gate.waiting >= 6, timeout=60, what="two batches on the wire")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        (killed,) = cursor.fetchone()
    assert killed >= 2  # each worker's connection (at least)
    gate.open()

    run = wait_run_final(timeout=90, tick=sweep_runs)
    assert (run.status, run.total, run.ok, run.deleted) == (RunStatus.SUCCEEDED, 12, 12, 0), run.error
    checks = recorded_checks(run.pk)
    assert len(checks) == 12 and set(checks.values()) == {1}
    assert fingerprints() == before
    assert RefreshBatch.objects.filter(run=run, status=BatchStatus.DONE).count() == 4
    assert latest_run().pk == run.pk
