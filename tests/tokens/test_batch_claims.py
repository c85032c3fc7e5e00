"""A batch is claimed before the upstream is called, so a second delivery of its message does
nothing (issue defect 11)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from werkzeug.wrappers import Response

from tests.conftest import ok
from tokens.models import RefreshBatch, RunStatus, RunTrigger
from tokens.services.refresh import token_refresh_batch, token_refresh_start


def slow(answer: Callable[[], Response], seconds: float = 0.3) -> Callable[[], Response]:
    """Slow enough that both deliveries are in flight together without claims."""

    def respond() -> Response:
        time.sleep(seconds)
        return answer()

    return respond


@pytest.mark.django_db(transaction=True)
def test_a_batch_delivered_twice_at_once_is_checked_once(upstream, make_token):
    tokens = [make_token() for _ in range(4)]
    for token in tokens:
        upstream.answers[token.token] = slow(ok)
    run = token_refresh_start(trigger=RunTrigger.BEAT, dispatch=lambda batch_id: None)  # we play the broker
    batch_id = run.batches.get().pk
    barrier = threading.Barrier(2)
    results: list[bool] = []

    def deliver() -> None:
        barrier.wait()
        try:
            results.append(token_refresh_batch(batch_id=batch_id))
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [False, True]
    assert [upstream.calls_for(token.token) for token in tokens] == [1, 1, 1, 1]
    run.refresh_from_db()
    assert (run.status, run.total, run.ok, run.batches_done) == (RunStatus.SUCCEEDED, 4, 4, 1)


@pytest.mark.django_db
def test_a_batch_claimed_by_a_live_worker_is_left_alone(upstream, make_token):
    make_token()
    run = token_refresh_start(trigger=RunTrigger.BEAT)
    batch = run.batches.get()
    RefreshBatch.objects.filter(pk=batch.pk).update(
        status="claimed", claimed_by="worker-a", claimed_until=timezone.now() + timedelta(minutes=5)
    )
    assert token_refresh_batch(batch_id=batch.pk) is False
    assert upstream.requests == []
    batch.refresh_from_db()
    assert (batch.status, batch.claimed_by) == ("claimed", "worker-a")


@pytest.mark.django_db
def test_an_expired_claim_is_taken_over(upstream, make_token):
    token = make_token()
    run = token_refresh_start(trigger=RunTrigger.BEAT)
    batch = run.batches.get()
    RefreshBatch.objects.filter(pk=batch.pk).update(
        status="claimed", claimed_by="dead-worker", claimed_until=timezone.now() - timedelta(seconds=1)
    )
    assert token_refresh_batch(batch_id=batch.pk) is True
    assert upstream.calls_for(token.token) == 1
    run.refresh_from_db()
    assert (run.status, run.ok) == (RunStatus.SUCCEEDED, 1)
