"""The refresh engine reaching the rate limit (issue 11): sizing, the gated pool, batches that
overlap (the next one is checked while the last one is recorded) and batch tasks that go on with
their run's pending batches."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections
from werkzeug.wrappers import Response

from tests.conftest import invalid, ok, server_error
from tokens.models import BaomingToken, BatchStatus, RefreshBatch, RunStatus, RunTrigger, TokenCheckRecord
from tokens.services.refresh import (
    CheckPool,
    check_concurrency,
    limiter_block_size,
    token_refresh_batch,
    token_refresh_run,
    token_refresh_start,
)

# --- sizing -----------------------------------------------------------------------------------


def test_concurrency_is_the_share_of_the_rate_times_the_latency():
    # 400 req/s at 50 ms shared by 2 workers: 10 each in flight, 15 with the safety margin.
    assert check_concurrency(rate=400, latency=0.05, workers=2, upper=32) == 15
    assert check_concurrency(rate=400, latency=0.05, workers=1, upper=32) == 30
    assert check_concurrency(rate=100, latency=0.05, workers=2, upper=32) == 4
    assert check_concurrency(rate=20, latency=0.05, workers=2, upper=32) == 1


def test_concurrency_is_clamped_to_one_and_the_upper_bound():
    assert check_concurrency(rate=100_000, latency=0.01, workers=2, upper=32) == 32
    assert check_concurrency(rate=1, latency=0.001, workers=8, upper=32) == 1
    assert check_concurrency(rate=1, latency=0.0, workers=1, upper=32) == 1
    assert check_concurrency(rate=400, latency=0.05, workers=0, upper=8) == 8


def test_the_default_upper_bound_reaches_400_per_second_at_50_ms_with_two_workers(settings):
    from django.conf import global_settings  # noqa: F401 - the project default comes from settings.py

    import leasesite.settings as project

    assert check_concurrency(rate=400, latency=0.05, workers=2, upper=project.BAOMING_CONCURRENCY) == 15
    assert project.BAOMING_CONCURRENCY >= 15


def test_limiter_blocks_cover_a_short_span_of_the_share_and_are_single_at_low_rates():
    assert limiter_block_size(rate=400, workers=2) == 10
    assert limiter_block_size(rate=20, workers=2) == 1
    assert limiter_block_size(rate=1, workers=1) == 1
    assert limiter_block_size(rate=100_000, workers=2) == 16


def test_the_pool_runs_at_most_its_limit_at_once_and_the_rest_idle():
    pool = CheckPool(6)
    try:
        pool.set_limit(2)
        running, most = 0, 0
        lock = threading.Lock()

        def job() -> None:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.05)
            with lock:
                running -= 1

        futures = [pool.submit(job) for _ in range(8)]
        for future in futures:
            future.result(timeout=10)
        assert most == 2
        pool.set_limit(6)
        futures = [pool.submit(job) for _ in range(12)]
        for future in futures:
            future.result(timeout=10)
        assert 2 < most <= 6
    finally:
        pool.shutdown()


# --- overlap ----------------------------------------------------------------------------------


def _batch_status_seen_by_another_connection(batch_id: int) -> str:
    """Read a batch's status on a connection of this thread (what another process would see)."""
    try:
        return RefreshBatch.objects.filter(pk=batch_id).values_list("status", flat=True).get()
    finally:
        connections.close_all()


def _batches_seen_by_another_connection() -> list[tuple[list[int], str]]:
    """The newest run's batches (token ids, status) read on this thread's own connection: what
    another process would see."""
    try:
        run_id = RefreshBatch.objects.order_by("-run_id").values_list("run_id", flat=True).first()
        return [
            (ids, status)
            for ids, status in RefreshBatch.objects.filter(run_id=run_id)
            .order_by("number")
            .values_list("token_ids", "status")
        ]
    finally:
        connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_the_next_batch_is_checked_before_the_last_one_is_recorded(upstream, make_token, settings):
    """Regression (issue 11): the runner waited for each batch to be recorded before it asked
    anything for the next one. Batch 0's last token answers slowly; batch 1's first request must
    reach the upstream while batch 0 is still unrecorded, and everything is recorded right."""
    settings.BAOMING_CONCURRENCY = 4
    settings.BAOMING_BATCH_SIZE = 3
    tokens = [make_token() for _ in range(6)]
    ids = {token.token: token.pk for token in tokens}
    seen: list[str] = []

    def answer_for(value: str):
        def respond() -> Response:
            batches = _batches_seen_by_another_connection()
            (first_ids, first_status), (second_ids, _status) = batches
            if ids[value] == first_ids[-1]:
                time.sleep(0.6)  # batch 0's last check is slow
            if ids[value] in second_ids:
                seen.append(first_status)  # what batch 0 was when batch 1 was being checked
                if ids[value] == second_ids[0]:
                    return invalid()
            return ok()

        return respond

    for token in tokens:
        upstream.answers[token.token] = answer_for(token.token)
    result = token_refresh_run(trigger=RunTrigger.COMMAND)
    assert len(seen) == 3, "the second batch was not checked"
    assert BatchStatus.CLAIMED in seen, f"batch 1 was checked only after batch 0 was recorded: {seen}"
    assert (result.status, result.total, result.ok, result.invalid, result.deleted) == (
        RunStatus.SUCCEEDED,
        6,
        5,
        1,
        1,
    )
    assert sorted(upstream.calls_for(t.token) for t in tokens) == [1] * 6
    assert TokenCheckRecord.objects.filter(run=result).count() == 6
    connection.close()


@pytest.fixture
def small_batches(settings):
    settings.BAOMING_BATCH_SIZE = 3
    return settings


@pytest.mark.django_db(transaction=True)
def test_overlapped_batches_record_right_counts_history_and_deletions(upstream, make_token, small_batches):
    """Ten batches of three, mixed answers, checked with batches overlapping: the run's counts,
    every token's state, the history rows and the deletions are exactly as if one by one."""
    small_batches.BAOMING_BREAKER_THRESHOLD = 0.9
    tokens = [make_token() for _ in range(30)]
    for token in tokens[::5]:
        upstream.answers[token.token] = invalid
    for token in tokens[1::5]:
        upstream.answers[token.token] = server_error
    result = token_refresh_run(trigger=RunTrigger.COMMAND)
    assert (result.status, result.total, result.ok, result.invalid, result.failed, result.deleted) == (
        RunStatus.SUCCEEDED,
        30,
        18,
        6,
        6,
        6,
    )
    assert result.batches_done == result.batches_total == 10
    assert not RefreshBatch.objects.filter(run=result).exclude(status=BatchStatus.DONE).exists()
    assert BaomingToken.objects.count() == 24
    assert BaomingToken.objects.filter(consecutive_failures=1).count() == 6
    assert BaomingToken.objects.filter(last_used__isnull=False).count() == 18
    assert TokenCheckRecord.objects.filter(run=result).count() == 30
    assert sorted({upstream.calls_for(t.token) for t in tokens}) == [1]


# --- batch tasks go on with their run ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_batch_task_goes_on_with_its_runs_pending_batches(upstream, make_token):
    tokens = [make_token() for _ in range(10)]
    upstream.answers[tokens[3].token] = invalid
    run = token_refresh_start(trigger=RunTrigger.BEAT, batch_size=3, dispatch=lambda batch_id: None)
    ids = list(run.batches.order_by("number").values_list("id", flat=True))
    assert token_refresh_batch(batch_id=ids[1], drain_seconds=60) is True
    # Every batch is done by that one call; the others' messages now find nothing to do.
    assert [token_refresh_batch(batch_id=batch_id, drain_seconds=60) for batch_id in ids] == [False] * 4
    run.refresh_from_db()
    assert (run.status, run.total, run.ok, run.deleted, run.batches_done) == (RunStatus.SUCCEEDED, 10, 9, 1, 4)
    assert sorted({upstream.calls_for(t.token) for t in tokens}) == [1]


@pytest.mark.django_db(transaction=True)
def test_a_second_delivery_drains_nothing(upstream, make_token):
    """A task whose own batch is claimed by a live worker does nothing at all — not even the
    run's other pending batches (they are that worker's to take, or their own messages')."""
    from datetime import timedelta

    from django.utils import timezone

    for _ in range(6):
        make_token()
    run = token_refresh_start(trigger=RunTrigger.BEAT, batch_size=3, dispatch=lambda batch_id: None)
    first, second = run.batches.order_by("number")
    RefreshBatch.objects.filter(pk=first.pk).update(
        status=BatchStatus.CLAIMED, claimed_by="worker-a", claimed_until=timezone.now() + timedelta(minutes=5)
    )
    assert token_refresh_batch(batch_id=first.pk, drain_seconds=60) is False
    assert upstream.requests == []
    second.refresh_from_db()
    assert second.status == BatchStatus.PENDING


@pytest.mark.django_db(transaction=True)
def test_without_drain_a_batch_call_works_only_its_batch(upstream, make_token):
    for _ in range(6):
        make_token()
    run = token_refresh_start(trigger=RunTrigger.BEAT, batch_size=3, dispatch=lambda batch_id: None)
    first, second = run.batches.order_by("number")
    assert token_refresh_batch(batch_id=first.pk) is True
    second.refresh_from_db()
    assert second.status == BatchStatus.PENDING
    assert len(upstream.requests) == 3


@pytest.mark.django_db(transaction=True)
def test_a_draining_task_holds_at_most_two_batches_at_a_time(upstream, make_token, settings):
    """What a process keeps does not grow with the run: while one task works a run of eight
    batches, never more than two of them are claimed (the current one and the next)."""
    settings.BAOMING_CONCURRENCY = 4
    tokens = [make_token() for _ in range(24)]
    claimed_seen: list[int] = []

    def answer() -> Response:
        try:
            claimed_seen.append(RefreshBatch.objects.filter(status=BatchStatus.CLAIMED).count())
        finally:
            connections.close_all()
        return ok()

    for token in tokens:
        upstream.answers[token.token] = answer
    run = token_refresh_start(trigger=RunTrigger.BEAT, batch_size=3, dispatch=lambda batch_id: None)
    first = run.batches.order_by("number").first()
    assert token_refresh_batch(batch_id=first.pk, drain_seconds=60) is True
    run.refresh_from_db()
    assert (run.status, run.total, run.ok, run.batches_done) == (RunStatus.SUCCEEDED, 24, 24, 8)
    assert len(claimed_seen) == 24
    assert max(claimed_seen) <= 2
