"""The run lock is renewed while checks wait on Retry-After, and a run that lost its lock writes
nothing (issue defect 9). The upstream is a real local server; what "another process" does is
done from the server's own thread, at the exact moment of a request, so nothing depends on timing
but the Retry-After pause being longer than the lock's lifetime."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from django.db import connection
from django.utils import timezone
from werkzeug.wrappers import Response

from leasesite.models import JobLock
from tests.conftest import json_answer, ok
from tokens.models import BaomingToken, RefreshBatch, RefreshRun, RunStatus, RunTrigger
from tokens.services.refresh import REFRESH_LOCK_NAME, RefreshAlreadyRunning, token_refresh_run, token_refresh_start

pytestmark = pytest.mark.django_db(transaction=True)


def answer_after(action: Callable[[], None]) -> Callable[[], Response]:
    """An upstream answer ("ok") given after ``action`` ran in the server's thread."""

    def respond() -> Response:
        try:
            action()
        finally:
            connection.close()  # the server thread's own database connection
        return ok()

    return respond


def retry_after(seconds: int) -> Callable[[], Response]:
    return json_answer({}, status=429, headers={"Retry-After": str(seconds)})


def test_lock_is_renewed_while_every_check_waits_on_retry_after(upstream, make_token, settings):
    settings.BAOMING_RUN_LOCK_TTL = 2
    token = make_token()
    second_start: list[str] = []
    claim_alive: list[bool] = []

    def start_another_run() -> None:
        try:
            token_refresh_start(trigger=RunTrigger.BEAT)
            second_start.append("took over")
        except RefreshAlreadyRunning:
            second_start.append("refused")
        claimed_until = getattr(
            RefreshBatch.objects.filter(run__trigger=RunTrigger.COMMAND).get(), "claimed_until", None
        )
        claim_alive.append(claimed_until is not None and claimed_until > timezone.now())

    # The retry comes 4 s after the first answer: twice the lock's lifetime.
    upstream.answers[token.token] = [retry_after(4), answer_after(start_another_run)]
    result = token_refresh_run(trigger=RunTrigger.COMMAND)

    assert second_start == ["refused"]
    assert claim_alive == [True]  # the batch's claim was renewed too
    assert (result.status, result.ok, result.rate_limited) == (RunStatus.SUCCEEDED, 1, 1)
    assert RefreshRun.objects.count() == 1
    token.refresh_from_db()
    assert token.last_used is not None


def test_a_batch_of_a_run_taken_over_meanwhile_records_nothing(upstream, make_token):
    token = make_token(consecutive_failures=1)

    def take_over() -> None:  # what a second run's start does once the lock expired
        JobLock.objects.filter(name=REFRESH_LOCK_NAME).update(owner="another-run")
        RefreshRun.objects.filter(status=RunStatus.RUNNING).update(status=RunStatus.ABANDONED)

    upstream.answers[token.token] = answer_after(take_over)
    result = token_refresh_run(trigger=RunTrigger.COMMAND)

    assert result.status == RunStatus.ABANDONED
    assert (result.total, result.ok, result.batches_done) == (0, 0, 0)
    token.refresh_from_db()
    assert (token.last_used, token.last_checked_at, token.consecutive_failures) == (None, None, 1)
    assert JobLock.objects.get(name=REFRESH_LOCK_NAME).owner == "another-run"  # not released by the loser


def test_a_run_whose_lock_was_taken_abandons_itself_and_alerts(upstream, make_token, settings, caplog):
    settings.BAOMING_RUN_LOCK_TTL = 2
    token = make_token()

    def steal_lock() -> None:
        JobLock.objects.filter(name=REFRESH_LOCK_NAME).update(owner="another-run")

    upstream.answers[token.token] = [retry_after(1), answer_after(steal_lock)]
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        result = token_refresh_run(trigger=RunTrigger.COMMAND)

    assert result.status == RunStatus.ABANDONED and "lock" in result.error
    assert BaomingToken.objects.get(pk=token.pk).last_used is None
    assert any(r.getMessage().startswith("ALERT") and f"#{result.pk}" in r.getMessage() for r in caplog.records)
