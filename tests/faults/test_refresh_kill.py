"""Fault family 2: workers killed (``kill -9``) or stopped (SIGTERM) in the middle of a token refresh.

Two real solo workers share a run of 8 batches of 3 tokens. The upstream holds every answer at a
gate, so when the signal arrives each worker is certainly inside a batch, its 3 checks on the
wire. What the code promises (tokens/services/sweeper.py, README "The run sweeper"):

- ``kill -9``: the killed batches stay claimed until their claim expires; the queued ones are
  taken by the restarted workers; the sweeper sends the killed ones again once the run shows no
  sign of life. The run completes: every token is recorded exactly once, and the tokens of the
  killed batches are asked exactly once more. No worker at all → the sweeper closes the run as
  ``abandoned`` with an alert, and the next run completes.
- SIGTERM: Celery's warm shutdown finishes the batch in hand and leaves the rest queued; nothing
  is asked twice.
"""

from __future__ import annotations

import logging
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from tests.conftest import invalid, ok
from tests.faults import processes
from tests.faults._h4_support import (
    Gate,
    fingerprints,
    latest_run,
    make_tokens,
    recorded_checks,
    wait_run_final,
    worker_env,
    workers_fixture,  # noqa: F401 - the fixture
)
from tokens.models import BatchStatus, RefreshBatch, RunStatus, TokenDeletion
from tokens.tasks import refresh_tokens, sweep_runs

pytestmark = pytest.mark.django_db(transaction=True)

BATCHES, BATCH_SIZE = 8, 3
TOKENS = BATCHES * BATCH_SIZE


@pytest.fixture
def fast_sweeper(settings) -> None:
    """This process plays beat's sweeper, with the workers' short timings."""
    settings.BAOMING_RUN_LOCK_TTL = 10
    settings.BAOMING_SWEEP_GRACE_SECONDS = 10
    settings.BAOMING_SWEEP_MAX_REDISPATCHES = 3


def start_gated_run(upstream, workers, gate: Gate, **env: str):
    """24 tokens (one answers invalid), 2 workers, a run whose first batches are held at the gate.

    How many batches each worker has claimed when the signal comes is the engine's business (it
    may claim the next batch before the current one is done): the tests only count on some being
    in hand, and on some still waiting in the queue."""
    tokens = make_tokens(TOKENS)
    dead = tokens[-1]
    for token in tokens:
        upstream.answers[token.token] = gate.answer(invalid if token.pk == dead.pk else ok)
    environment = worker_env(upstream.url, BAOMING_BATCH_SIZE=str(BATCH_SIZE), BAOMING_CONCURRENCY="4", **env)
    workers.start(2, environment)
    refresh_tokens.delay()
    processes.wait_for(lambda: gate.waiting >= 2 * BATCH_SIZE, timeout=60, what="two batches on the wire")
    processes.wait_for(
        lambda: RefreshBatch.objects.filter(status=BatchStatus.CLAIMED).count() >= 2, timeout=10, what="2 claims"
    )
    return tokens, dead, environment


def requested(upstream) -> set[str]:
    return {r["token"] for r in upstream.requests}


def assert_run_state_after_the_fault(tokens) -> None:
    run = latest_run()
    assert run.status == RunStatus.RUNNING and run.total == 0
    assert RefreshBatch.objects.filter(status=BatchStatus.DONE).count() == 0
    assert RefreshBatch.objects.filter(status=BatchStatus.PENDING).exists()  # work left in the queue
    assert len(fingerprints()) == len(tokens)


def test_kill_9_of_both_workers_mid_batch_the_run_completes_after_restart(upstream, workers, fast_sweeper, caplog):
    gate = Gate()
    tokens, dead, env = start_gated_run(upstream, workers, gate)
    before = fingerprints()

    workers.kill9()
    gate.open()  # the held answers go to dead sockets
    assert_run_state_after_the_fault(tokens)
    held = requested(upstream)  # asked before the kill, never recorded

    workers.start(2, env)
    with caplog.at_level(logging.WARNING, logger="tokens.services.sweeper"):
        run = wait_run_final(timeout=90, tick=sweep_runs)

    assert (run.status, run.total, run.ok, run.invalid, run.deleted) == (RunStatus.SUCCEEDED, TOKENS, TOKENS - 1, 1, 1)
    assert fingerprints() == before - {dead.fingerprint}  # only the token the upstream called invalid
    assert list(TokenDeletion.objects.values_list("token_pk", flat=True)) == [dead.pk]
    assert set(recorded_checks(run.pk).values()) == {1} and len(recorded_checks(run.pk)) == TOKENS
    calls = {t.token: upstream.calls_for(t.token) for t in tokens}
    assert {token for token, n in calls.items() if n == 2} == held  # the killed batches: once more
    assert {n for token, n in calls.items() if token not in held} == {1}
    assert any("to the workers again" in r.getMessage() for r in caplog.records)


def test_sigterm_to_both_workers_finishes_the_batches_in_hand_and_asks_nothing_twice(upstream, workers, fast_sweeper):
    gate = Gate()
    tokens, _dead, env = start_gated_run(upstream, workers, gate)
    first = list(workers.procs)
    for proc in first:
        proc.send_signal(signal.SIGTERM)
    processes.wait_for(
        lambda: workers.log_text().count("Warm shutdown") >= 2, timeout=20, what="both workers shutting down"
    )
    gate.open()
    for proc in first:
        assert proc.wait(timeout=90) == 0  # warm shutdown: the work in hand is finished, then exit

    run = latest_run()
    left = RefreshBatch.objects.filter(run=run).exclude(status=BatchStatus.DONE).count()
    print(f"SIGTERM: {BATCHES - left} of {BATCHES} batches recorded before the workers exited")
    assert not RefreshBatch.objects.filter(run=run, status=BatchStatus.CLAIMED).exists()  # nothing left half-done
    # A worker shutting down takes no further batch: each finishes what it holds (its batch and the
    # one overlapped behind it, at most) and leaves the rest to the others, so it stops in time.
    assert BATCHES - left <= 2 * 2, f"{BATCHES - left} batches were worked after SIGTERM"

    workers.start(2, env)
    run = wait_run_final(timeout=60, tick=sweep_runs)
    assert (run.status, run.total, run.ok, run.deleted) == (RunStatus.SUCCEEDED, TOKENS, TOKENS - 1, 1)
    assert sorted(upstream.calls_for(t.token) for t in tokens) == [1] * TOKENS
    assert set(recorded_checks(run.pk).values()) == {1} and len(recorded_checks(run.pk)) == TOKENS
    assert len(fingerprints()) == TOKENS - 1


def _time_passes(run_id: int, seconds: int) -> None:
    """Move the run's clocks back (its sign of life, its batches' dispatch and claims): the
    sweeper's view after ``seconds`` without a worker, without waiting them out."""
    past = timezone.now() - timedelta(seconds=seconds)
    from tokens.models import RefreshRun

    RefreshRun.objects.filter(pk=run_id).update(heartbeat_at=past)
    RefreshBatch.objects.filter(run_id=run_id).update(dispatched_at=past)
    RefreshBatch.objects.filter(run_id=run_id, status=BatchStatus.CLAIMED).update(claimed_until=past)


def test_kill_9_and_no_worker_comes_back_abandons_with_one_alert_then_the_next_run_completes(
    upstream, workers, fast_sweeper, settings, caplog
):
    settings.BAOMING_SWEEP_MAX_REDISPATCHES = 1
    gate = Gate()
    tokens, _dead, env = start_gated_run(upstream, workers, gate)
    workers.kill9()
    gate.open()
    run = latest_run()
    held = requested(upstream)

    with caplog.at_level(logging.WARNING):
        _time_passes(run.pk, 60)
        sweep_runs()  # sends the 4 unfinished batches again: nobody takes them
        assert RefreshBatch.objects.filter(run=run, redispatches=1).count() == BATCHES
        _time_passes(run.pk, 60)
        sweep_runs()
        sweep_runs()  # a second sweeper pass changes nothing more
    run.refresh_from_db()
    assert run.status == RunStatus.ABANDONED and run.ended_at is not None
    alerts = [r.getMessage() for r in caplog.records if r.name == "leasesite.alerts" and "ALERT" in r.getMessage()]
    assert len(alerts) == 1 and f"#{run.pk}" in alerts[0], alerts
    assert len(fingerprints()) == TOKENS and run.deleted == 0  # an unfinished run deletes nothing

    workers.start(2, env)
    refresh_tokens.delay()
    second = wait_run_final(after_id=run.pk, timeout=60)
    assert (second.status, second.total, second.ok, second.deleted) == (RunStatus.SUCCEEDED, TOKENS, TOKENS - 1, 1)
    assert recorded_checks(run.pk) == {}  # the stale messages of the abandoned run did nothing
    calls = {t.token: upstream.calls_for(t.token) for t in tokens}
    assert {t for t, n in calls.items() if n == 2} == held and {n for t, n in calls.items() if t not in held} == {1}
