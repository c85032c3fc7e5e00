from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tokens.models import BaomingToken, DeletionReason, RunKind, RunStatus, TokenDeletion
from tokens.services.cleanup import CleanupAlreadyRunning, token_cleanup_run

pytestmark = pytest.mark.django_db


def answered_yesterday() -> object:
    """The upstream gave a real answer about the token recently (without vouching for it):
    only such tokens are cleanup's to delete (see test_cleanup_evidence.py)."""
    return timezone.now() - timedelta(days=1)


def test_deletes_tokens_unused_for_n_days_with_audit(make_token):
    now = timezone.now()
    fresh = make_token(last_used=now - timedelta(days=3))
    new = make_token()
    stale_used = make_token(last_used=now - timedelta(days=31), last_answered_at=answered_yesterday())
    stale_never_used = make_token(created_at=now - timedelta(days=40), last_answered_at=answered_yesterday())
    recent_created_old_use = make_token(created_at=now - timedelta(days=40), last_used=now - timedelta(days=1))

    run = token_cleanup_run(days=30, trigger="command")

    assert (run.kind, run.status, run.deleted, run.total, run.planned) == (
        RunKind.CLEANUP,
        RunStatus.SUCCEEDED,
        2,
        2,
        2,
    )
    remaining = set(BaomingToken.objects.values_list("id", flat=True))
    assert remaining == {fresh.pk, new.pk, recent_created_old_use.pk}
    audits = TokenDeletion.objects.filter(run=run)
    assert {a.token_pk for a in audits} == {stale_used.pk, stale_never_used.pk}
    assert all(a.reason == DeletionReason.STALE and "30 days" in a.detail for a in audits)


def test_cleanup_in_batches(make_token, monkeypatch):
    from tokens.services import deletion

    monkeypatch.setattr(deletion, "DELETE_CHUNK_SIZE", 3)
    old = timezone.now() - timedelta(days=100)
    for _ in range(8):
        make_token(created_at=old, last_answered_at=answered_yesterday())
    with CaptureQueriesContext(connection) as queries:
        run = token_cleanup_run(days=30, trigger="beat")
    assert run.deleted == 8 and not BaomingToken.objects.exists()
    assert TokenDeletion.objects.count() == 8
    token_deletes = [q for q in queries if q["sql"].startswith('DELETE FROM "tokens_baomingtoken"')]
    assert len(token_deletes) == 3  # chunks of 3, 3 and 2


def test_dry_run_deletes_nothing(make_token):
    make_token(created_at=timezone.now() - timedelta(days=100), last_answered_at=answered_yesterday())
    run = token_cleanup_run(days=30, trigger="command", dry_run=True)
    assert run.deleted == 1 and run.dry_run
    assert BaomingToken.objects.count() == 1 and not TokenDeletion.objects.exists()


def test_days_must_be_positive():
    with pytest.raises(ValueError, match="between 1 and 36500"):
        token_cleanup_run(days=0, trigger="command")


@pytest.mark.django_db(transaction=True)
def test_two_cleanups_at_once_audit_each_token_once(make_token, monkeypatch):
    import threading

    from django.db import connection

    from tokens.services import deletion

    monkeypatch.setattr(deletion, "DELETE_CHUNK_SIZE", 5)
    old = timezone.now() - timedelta(days=100)
    ids = {make_token(created_at=old, last_answered_at=answered_yesterday()).pk for _ in range(40)}
    barrier = threading.Barrier(2)
    runs, refused = [], []

    def clean() -> None:
        barrier.wait()
        try:
            runs.append(token_cleanup_run(days=30, trigger="beat"))
        except CleanupAlreadyRunning as exc:
            refused.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=clean) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not BaomingToken.objects.exists()
    audited = list(TokenDeletion.objects.values_list("token_pk", flat=True))
    assert sorted(audited) == sorted(ids)  # every token exactly once
    assert sum(run.deleted for run in runs) == 40
    # One run did it: the other was refused by the cleanup lock (or, started after the first
    # ended, found nothing left).
    assert sorted(run.deleted for run in runs) in ([40], [0, 40])
    assert len(runs) + len(refused) == 2
