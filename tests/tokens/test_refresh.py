"""The refresh service against a real local upstream, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from leasesite.models import JobLock
from tests.conftest import invalid, json_answer, new_token_value, ok, server_error, throttled
from tokens.models import BaomingToken, DeletionReason, RefreshBatch, RefreshRun, RunStatus, TokenDeletion
from tokens.services.refresh import (
    REFRESH_LOCK_NAME,
    RefreshAlreadyRunning,
    token_refresh_batch,
    token_refresh_run,
    token_refresh_start,
)

pytestmark = pytest.mark.django_db


def run(**kwargs) -> RefreshRun:
    kwargs.setdefault("trigger", "command")
    return token_refresh_run(**kwargs)


def test_valid_invalid_and_transient_answers(upstream, make_token):
    good = make_token(consecutive_failures=2, last_error="old")
    bad = make_token()
    flaky = make_token()
    upstream.answers[bad.token] = invalid
    upstream.answers[flaky.token] = server_error

    result = run()

    assert (result.status, result.total, result.ok, result.invalid, result.failed, result.deleted) == (
        RunStatus.SUCCEEDED,
        3,
        1,
        1,
        1,
        1,
    )
    good.refresh_from_db()
    assert good.last_used is not None and good.last_checked_at is not None
    assert (good.consecutive_failures, good.last_error) == (0, "")
    assert not BaomingToken.objects.filter(pk=bad.pk).exists()
    audit = TokenDeletion.objects.get(token_pk=bad.pk)
    assert audit.reason == DeletionReason.INVALID
    assert audit.run_id == result.pk
    assert audit.token_masked == f"{bad.token[:4]}…{bad.token[-4:]}"
    assert audit.card_name == bad.card_name and "invalid access_token" in audit.detail
    flaky.refresh_from_db()
    assert flaky.last_used is None
    assert (flaky.consecutive_failures, flaky.last_error) == (1, "HTTP 500")
    assert result.ended_at and result.duration_seconds is not None
    assert not JobLock.objects.filter(name=REFRESH_LOCK_NAME).exists()


def test_rate_limited_answer_is_retried_within_the_run_honouring_retry_after(upstream, make_token):
    token = make_token()
    upstream.answers[token.token] = [json_answer({}, status=429, headers={"Retry-After": "0.3"}), throttled, ok]
    started = time.monotonic()
    result = run()
    assert time.monotonic() - started >= 0.3
    assert (result.ok, result.rate_limited, result.failed, result.deleted) == (1, 2, 0, 0)
    assert upstream.calls_for(token.token) == 3
    token.refresh_from_db()
    assert token.last_used is not None


def test_persistent_rate_limit_never_deletes(upstream, make_token, settings):
    settings.BAOMING_RATE_LIMIT_RETRIES = 1
    token = make_token()
    upstream.answers[token.token] = json_answer({}, status=429, headers={"Retry-After": "0"})
    result = run()
    assert (result.ok, result.failed, result.deleted, result.rate_limited) == (0, 1, 0, 2)
    assert BaomingToken.objects.filter(pk=token.pk).exists()


def test_circuit_breaker_keeps_tokens_when_most_answers_say_invalid(upstream, make_token, caplog):
    tokens = [make_token() for _ in range(25)]
    for token in tokens[:20]:
        upstream.answers[token.token] = invalid
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        result = run()
    assert result.status == RunStatus.TRIPPED and result.breaker_tripped
    assert (result.invalid, result.deleted) == (20, 0)
    assert BaomingToken.objects.count() == 25
    kept = BaomingToken.objects.get(pk=tokens[0].pk)
    assert kept.invalid_in_run is None and "circuit breaker" in kept.last_error
    assert "circuit breaker tripped" in caplog.text


def test_breaker_holds_for_small_runs_too(upstream, make_token):
    """No minimum number of answers any more (see test_breaker.py)."""
    tokens = [make_token() for _ in range(10)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    result = run()
    assert (result.status, result.deleted) == (RunStatus.TRIPPED, 0)


def test_breaker_tolerates_a_minority_of_invalid_answers(upstream, make_token):
    tokens = [make_token() for _ in range(30)]
    for token in tokens[:10]:
        upstream.answers[token.token] = invalid
    result = run()
    assert (result.status, result.deleted, BaomingToken.objects.count()) == (RunStatus.SUCCEEDED, 10, 20)


def test_max_age_days_selects_recently_used_and_new_tokens(upstream, make_token):
    now = timezone.now()
    recent = make_token(last_used=now - timedelta(days=2))
    new = make_token()
    old = make_token(last_used=now - timedelta(days=10))
    old_never_used = make_token(created_at=now - timedelta(days=10))
    result = run(max_age_days=7)
    assert result.total == 2
    checked = {r["token"] for r in upstream.requests}
    assert checked == {recent.token, new.token}
    assert old.token not in checked and old_never_used.token not in checked


def test_least_recently_checked_first(upstream, make_token, settings):
    settings.BAOMING_CONCURRENCY = 1
    now = timezone.now()
    a = make_token(last_checked_at=now - timedelta(hours=1))
    b = make_token(last_checked_at=now - timedelta(hours=5))
    c = make_token()
    run()
    assert [r["token"] for r in upstream.requests] == [c.token, b.token, a.token]


def test_dry_run_changes_nothing(upstream, make_token):
    good, bad = make_token(), make_token()
    upstream.answers[bad.token] = invalid
    result = run(dry_run=True)
    assert result.dry_run and result.status == RunStatus.SUCCEEDED
    assert (result.ok, result.invalid, result.deleted) == (1, 1, 1)  # deleted = "would delete"
    assert BaomingToken.objects.count() == 2
    assert not TokenDeletion.objects.exists()
    good.refresh_from_db()
    assert good.last_used is None and good.last_checked_at is None


def test_run_fans_out_in_batches(upstream, make_token):
    tokens = [make_token() for _ in range(10)]
    upstream.answers[tokens[4].token] = invalid
    dispatched: list[int] = []
    started = token_refresh_start(trigger="beat", batch_size=3, dispatch=dispatched.append)
    assert (started.planned, started.batches_total) == (10, 4)
    # On a non-transactional test the on_commit callbacks never run; run batches by hand.
    for batch_id in RefreshBatch.objects.filter(run=started).order_by("number").values_list("id", flat=True):
        assert token_refresh_batch(batch_id=batch_id) is True
    started.refresh_from_db()
    assert (started.status, started.total, started.ok, started.deleted, started.batches_done) == (
        RunStatus.SUCCEEDED,
        10,
        9,
        1,
        4,
    )


def test_batch_is_idempotent(upstream, make_token):
    make_token()
    started = token_refresh_start(trigger="beat")
    batch = started.batches.get()
    assert token_refresh_batch(batch_id=batch.pk) is True
    assert token_refresh_batch(batch_id=batch.pk) is False
    started.refresh_from_db()
    assert (started.total, started.ok) == (1, 1)
    assert len(upstream.requests) == 1


def test_dispatch_happens_on_commit(upstream, make_token, django_capture_on_commit_callbacks):
    for _ in range(5):
        make_token()
    dispatched: list[int] = []
    with django_capture_on_commit_callbacks(execute=True):
        started = token_refresh_start(trigger="beat", batch_size=2, dispatch=dispatched.append)
    assert sorted(dispatched) == sorted(started.batches.values_list("id", flat=True))
    assert len(dispatched) == 3


def test_empty_run_finishes_at_once(upstream):
    result = run()
    assert (result.status, result.total, result.batches_total) == (RunStatus.SUCCEEDED, 0, 0)
    assert not JobLock.objects.exists()


def test_every_check_failing_fails_the_run(upstream, make_token):
    token = make_token()
    upstream.answers[token.token] = server_error
    result = run()
    assert result.status == RunStatus.FAILED
    assert "every check failed" in result.error


def test_second_run_while_one_holds_the_lock_is_refused(upstream, make_token):
    make_token()
    first = token_refresh_start(trigger="beat")
    with pytest.raises(RefreshAlreadyRunning):
        token_refresh_start(trigger="command")
    assert RefreshRun.objects.count() == 1
    token_refresh_batch(batch_id=first.batches.get().pk)
    first.refresh_from_db()
    assert first.status == RunStatus.SUCCEEDED
    assert run().status == RunStatus.SUCCEEDED  # the lock was released by the finished run


def test_expired_lock_is_taken_over_and_the_stale_run_abandoned(upstream, make_token):
    make_token()
    stale = token_refresh_start(trigger="beat")
    JobLock.objects.filter(name=REFRESH_LOCK_NAME).update(expires_at=timezone.now() - timedelta(seconds=1))
    fresh = token_refresh_start(trigger="beat")
    stale.refresh_from_db()
    assert stale.status == RunStatus.ABANDONED
    # A late batch of the abandoned run does nothing.
    assert token_refresh_batch(batch_id=stale.batches.get().pk) is False
    assert token_refresh_batch(batch_id=fresh.batches.get().pk) is True


def test_batch_queries_do_not_grow_with_tokens(upstream, make_token, django_assert_max_num_queries, settings):
    tokens = [make_token() for _ in range(60)]
    for token in tokens[::3]:
        upstream.answers[token.token] = server_error
    for token in tokens[1::3]:
        upstream.answers[token.token] = invalid
    started = token_refresh_start(trigger="beat", batch_size=60)
    settings.BAOMING_BREAKER_THRESHOLD = 0.9
    # 60 tokens, a fixed bound: the history's one INSERT and one trimming DELETE, and the
    # finalizer's look for suspect tokens to delete, added three queries (was 40); the closing
    # run's look whether a "runs failing" alert is to be resolved, one more.
    with django_assert_max_num_queries(44):
        token_refresh_batch(batch_id=started.batches.get().pk)
    started.refresh_from_db()
    assert (started.ok, started.failed, started.deleted) == (20, 20, 20)


def test_no_plaintext_token_in_logs_or_audit(upstream, make_token, caplog):
    tokens = [make_token() for _ in range(3)]
    upstream.answers[tokens[0].token] = invalid
    upstream.answers[tokens[1].token] = server_error
    with caplog.at_level(logging.DEBUG):
        run()
    # The captured records went through the same formatting as the real handlers.
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for token in tokens:
        assert token.token not in text
    for row in TokenDeletion.objects.values():
        assert tokens[0].token not in str(row)


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_runs_do_not_both_work(upstream, make_token):
    for _ in range(3):
        make_token()
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def start() -> None:
        barrier.wait()
        try:
            token_refresh_start(trigger="beat")
            outcomes.append("started")
        except RefreshAlreadyRunning:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "started"]
    assert RefreshRun.objects.count() == 1


def test_a_token_encrypted_with_a_lost_key_fails_alone(upstream, make_token):
    from cryptography.fernet import Fernet

    good = make_token()
    orphan = make_token()
    foreign = Fernet(Fernet.generate_key()).encrypt(b"f" * 32).decode()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE tokens_baomingtoken SET token = %s WHERE id = %s", [foreign, orphan.pk])
    result = run()
    assert (result.status, result.total, result.ok, result.failed, result.deleted) == (
        RunStatus.SUCCEEDED,
        2,
        1,
        1,
        0,
    )
    assert upstream.calls_for(good.token) == 1 and len(upstream.requests) == 1
    kept = BaomingToken.objects.filter(pk=orphan.pk).values("consecutive_failures", "last_error").get()
    assert kept == {"consecutive_failures": 1, "last_error": "cannot decrypt token (encryption key missing?)"}


@pytest.mark.django_db(transaction=True)
def test_a_token_replaced_by_a_new_scan_during_its_check_is_not_deleted(upstream, make_token):
    """A refresh batch checks the row's old token; meanwhile the same person scans again and the
    row gets a new, valid token. The old token's "invalid" answer is about a token no longer
    stored: the row (with its new token) must be neither flagged nor deleted."""
    from tokens.clients import QrIdentity
    from tokens.services.qrlogin import token_store_login

    row = make_token(unionid="o-same-person")
    old_token, new_token = row.token, new_token_value()

    def rescan_then_invalid():
        token_store_login(card_name=row.card_name, identity=QrIdentity(access_token=new_token, unionid="o-same-person"))
        connection.close()  # the server thread's own connection
        return invalid()

    upstream.answers[old_token] = rescan_then_invalid
    result = run()

    assert BaomingToken.objects.filter(pk=row.pk).exists()
    row.refresh_from_db()
    assert row.token == new_token and row.invalid_in_run is None
    assert not TokenDeletion.objects.filter(token_pk=row.pk).exists()
    assert result.deleted == 0
