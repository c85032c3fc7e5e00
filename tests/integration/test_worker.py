"""End to end: real Celery worker processes, the real Redis broker, the test database."""

from __future__ import annotations

import time

import pytest

from tests.conftest import invalid
from tokens.models import BaomingToken, RefreshRun, RunKind, RunStatus, TokenDeletion

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_for_run(kind: str, timeout: float = 90) -> RefreshRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = RefreshRun.objects.filter(kind=kind).order_by("-id").first()
        if run is not None and run.is_final:
            return run
        time.sleep(0.2)
    raise AssertionError(f"no finished {kind} run within {timeout}s")


def test_refresh_task_fans_out_over_two_workers(upstream, make_token, start_workers):
    tokens = [make_token() for _ in range(9)]
    upstream.answers[tokens[0].token] = invalid
    start_workers(2, BAOMING_BATCH_SIZE="2")

    from tokens.tasks import refresh_tokens

    refresh_tokens.delay(max_age_days=None)
    run = wait_for_run(RunKind.REFRESH)

    assert (run.status, run.trigger, run.total, run.ok, run.deleted) == (RunStatus.SUCCEEDED, "beat", 9, 8, 1)
    assert (run.batches_total, run.batches_done) == (5, 5)
    assert not BaomingToken.objects.filter(pk=tokens[0].pk).exists()
    assert TokenDeletion.objects.get().token_pk == tokens[0].pk
    assert BaomingToken.objects.filter(last_used__isnull=False).count() == 8
    assert len(upstream.requests) == 9  # every token checked exactly once


def test_cleanup_task_runs_on_a_worker(make_token, start_workers):
    from datetime import timedelta

    from django.utils import timezone

    make_token(created_at=timezone.now() - timedelta(days=45), last_answered_at=timezone.now() - timedelta(days=1))
    make_token()
    start_workers(1)

    from tokens.tasks import cleanup_tokens

    cleanup_tokens.delay(days=30)
    run = wait_for_run(RunKind.CLEANUP)
    assert (run.status, run.deleted) == (RunStatus.SUCCEEDED, 1)
    assert BaomingToken.objects.count() == 1


def test_sweeper_dispatches_again_the_batches_whose_messages_were_lost(upstream, make_token, start_workers, settings):
    """A run whose batch messages never reached the broker (Redis restarted, say) completes once
    the sweeper sends them again to a real worker; every token is checked exactly once."""
    from datetime import timedelta

    from django.utils import timezone

    from tokens.models import RefreshBatch
    from tokens.services.refresh import token_refresh_start
    from tokens.tasks import sweep_runs

    tokens = [make_token() for _ in range(5)]
    upstream.answers[tokens[0].token] = invalid
    run = token_refresh_start(trigger="beat", batch_size=2, dispatch=lambda batch_id: None)
    long_ago = timezone.now() - timedelta(seconds=settings.BAOMING_SWEEP_GRACE_SECONDS + 60)
    RefreshRun.objects.filter(pk=run.pk).update(heartbeat_at=long_ago)
    RefreshBatch.objects.filter(run=run).update(dispatched_at=long_ago)
    start_workers(1)

    sweep_runs()  # in this process, as beat would have it run: sends the batches to the broker
    run = wait_for_run(RunKind.REFRESH)

    assert (run.status, run.total, run.ok, run.deleted) == (RunStatus.SUCCEEDED, 5, 4, 1)
    assert sorted(upstream.calls_for(t.token) for t in tokens) == [1] * 5
