"""The run sweeper (issue defect 10): lost batches are dispatched again, dead runs are closed and
alerted on. Batches here are "dispatched" into a list (the broker); the real-worker version of
the same story is in tests/integration/test_worker.py."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from leasesite.models import JobLock
from tokens.models import BaomingToken, BatchStatus, RefreshBatch, RefreshRun, RunStatus, RunTrigger
from tokens.services.refresh import REFRESH_LOCK_NAME, token_refresh_batch, token_refresh_run, token_refresh_start
from tokens.services.sweeper import refresh_runs_sweep

pytestmark = pytest.mark.django_db


def lose_messages(batch_id: int) -> None:
    """A broker that loses every message (Redis restarted, worker killed before it acked)."""


def age(run: RefreshRun, seconds: float) -> None:
    """Pretend the run showed its last sign of life ``seconds`` ago."""
    then = timezone.now() - timedelta(seconds=seconds)
    RefreshRun.objects.filter(pk=run.pk).update(started_at=then, heartbeat_at=then)
    RefreshBatch.objects.filter(run=run).update(dispatched_at=then)


def alerts(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "leasesite.alerts" and r.getMessage().startswith("ALERT")
    ]


@pytest.fixture
def lost_run(upstream, make_token, settings) -> RefreshRun:
    settings.BAOMING_SWEEP_GRACE_SECONDS = 120
    for _ in range(5):
        make_token()
    return token_refresh_start(trigger=RunTrigger.BEAT, batch_size=2, dispatch=lose_messages)


def test_lost_batches_are_dispatched_again_and_the_run_completes(
    lost_run, upstream, django_capture_on_commit_callbacks
):
    age(lost_run, 300)
    dispatched: list[int] = []
    with django_capture_on_commit_callbacks(execute=True):
        report = refresh_runs_sweep(dispatch=dispatched.append)
    assert sorted(dispatched) == sorted(lost_run.batches.values_list("id", flat=True))
    assert report.redispatched == 3
    for batch_id in dispatched:
        token_refresh_batch(batch_id=batch_id)
    lost_run.refresh_from_db()
    assert (lost_run.status, lost_run.total) == (RunStatus.SUCCEEDED, 5)
    assert sorted(upstream.calls_for(t.token) for t in BaomingToken.objects.all()) == [1] * 5


def test_a_run_within_its_grace_period_is_left_alone(lost_run, django_capture_on_commit_callbacks):
    age(lost_run, 30)
    dispatched: list[int] = []
    with django_capture_on_commit_callbacks(execute=True):
        refresh_runs_sweep(dispatch=dispatched.append)
    assert dispatched == []
    lost_run.refresh_from_db()
    assert lost_run.status == RunStatus.RUNNING


def test_a_run_being_worked_on_is_left_alone(lost_run, django_capture_on_commit_callbacks):
    """A batch was claimed a moment ago: its worker is alive, the other messages are queued."""
    age(lost_run, 300)
    first = lost_run.batches.order_by("number").first()
    RefreshBatch.objects.filter(pk=first.pk).update(
        status=BatchStatus.CLAIMED, claimed_by="worker-a", claimed_until=timezone.now() + timedelta(minutes=5)
    )
    RefreshRun.objects.filter(pk=lost_run.pk).update(heartbeat_at=timezone.now())
    dispatched: list[int] = []
    with django_capture_on_commit_callbacks(execute=True):
        refresh_runs_sweep(dispatch=dispatched.append)
    assert dispatched == []


def test_re_dispatching_keeps_the_run_lock_so_no_run_takes_over(lost_run, django_capture_on_commit_callbacks):
    age(lost_run, 300)
    JobLock.objects.filter(name=REFRESH_LOCK_NAME).update(expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        refresh_runs_sweep(dispatch=lambda batch_id: None)
    lock = JobLock.objects.get(name=REFRESH_LOCK_NAME)
    assert (lock.owner, lock.expires_at > timezone.now()) == (lost_run.lock_owner, True)


def test_a_run_nobody_takes_is_abandoned_after_repeated_dispatches(
    lost_run, settings, caplog, django_capture_on_commit_callbacks
):
    settings.BAOMING_SWEEP_MAX_REDISPATCHES = 2
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        for _ in range(2):
            age(lost_run, 300)
            with django_capture_on_commit_callbacks(execute=True):
                refresh_runs_sweep(dispatch=lose_messages)
            lost_run.refresh_from_db()
            assert lost_run.status == RunStatus.RUNNING
        age(lost_run, 300)
        refresh_runs_sweep(dispatch=lose_messages)
    lost_run.refresh_from_db()
    assert lost_run.status == RunStatus.ABANDONED and lost_run.ended_at is not None
    assert not JobLock.objects.filter(name=REFRESH_LOCK_NAME).exists()
    assert [m for m in alerts(caplog) if f"#{lost_run.pk}" in m]


def test_a_dead_command_run_is_abandoned_when_its_lock_expires(upstream, make_token, caplog):
    """The command works its batches itself: they are never sent to a worker."""
    make_token()
    run = token_refresh_start(trigger=RunTrigger.COMMAND)  # the process then died (kill -9)
    age(run, 3600)
    JobLock.objects.filter(name=REFRESH_LOCK_NAME).update(expires_at=timezone.now() - timedelta(seconds=1))
    dispatched: list[int] = []
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        refresh_runs_sweep(dispatch=dispatched.append)
    run.refresh_from_db()
    assert run.status == RunStatus.ABANDONED and dispatched == []
    assert [m for m in alerts(caplog) if f"#{run.pk}" in m]
    assert token_refresh_run(trigger=RunTrigger.COMMAND).status == RunStatus.SUCCEEDED


def test_a_live_command_run_is_left_alone(upstream, make_token):
    make_token()
    run = token_refresh_start(trigger=RunTrigger.COMMAND)
    refresh_runs_sweep(dispatch=lambda batch_id: None)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING


def test_a_run_whose_last_batch_was_recorded_but_not_finalized_is_finalized(lost_run, upstream):
    """The worker died between recording the last batch and finalizing the run."""
    RefreshBatch.objects.filter(run=lost_run).update(status=BatchStatus.DONE)
    RefreshRun.objects.filter(pk=lost_run.pk).update(batches_done=3, total=5, ok=5)
    refresh_runs_sweep(dispatch=lose_messages)
    lost_run.refresh_from_db()
    assert lost_run.status == RunStatus.SUCCEEDED
    assert not JobLock.objects.filter(name=REFRESH_LOCK_NAME).exists()


def test_a_stale_dry_run_is_closed_without_an_alert(upstream, make_token, settings, caplog):
    make_token()
    run = token_refresh_start(trigger=RunTrigger.COMMAND, dry_run=True)
    age(run, settings.BAOMING_RUN_LOCK_TTL + 60)
    with caplog.at_level(logging.INFO, logger="leasesite.alerts"):
        refresh_runs_sweep(dispatch=lose_messages)
    run.refresh_from_db()
    assert run.status == RunStatus.ABANDONED
    assert alerts(caplog) == []


def test_taking_over_an_expired_lock_abandons_the_old_run_with_an_alert(upstream, make_token, caplog):
    make_token()
    stale = token_refresh_start(trigger=RunTrigger.BEAT)
    JobLock.objects.filter(name=REFRESH_LOCK_NAME).update(expires_at=timezone.now() - timedelta(seconds=1))
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        token_refresh_start(trigger=RunTrigger.BEAT)
    stale.refresh_from_db()
    assert stale.status == RunStatus.ABANDONED
    assert [m for m in alerts(caplog) if f"#{stale.pk}" in m]


def test_the_sweeper_runs_every_minute():
    task = PeriodicTask.objects.select_related("interval").get(task="tokens.sweep_runs")
    assert (task.interval.every, task.interval.period) == (1, IntervalSchedule.MINUTES)
    assert json.loads(task.kwargs) == {} and 60 <= task.expire_seconds <= 120
