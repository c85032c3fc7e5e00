"""Celery tasks: thin shells over ``tokens.services``. They take ids, never tokens."""

from __future__ import annotations

import logging
import threading

import redis
from celery import shared_task
from celery.signals import worker_shutting_down
from django.db import OperationalError
from django.utils.translation import gettext as _

from leasesite.notify import alert_send
from tokens.models import RunTrigger
from tokens.services.cleanup import CleanupAlreadyRunning, token_cleanup_run
from tokens.services.qrlogin import QR_POLL_INTERVAL_SECONDS, qr_login_tick
from tokens.services.refresh import (
    BATCH_DRAIN_SECONDS,
    RefreshAlreadyRunning,
    token_refresh_batch,
    token_refresh_start,
)
from tokens.services.runs import InvalidRunArguments
from tokens.services.sweeper import refresh_runs_sweep

logger = logging.getLogger(__name__)


def _refuse(task_name: str, exc: InvalidRunArguments) -> None:
    """A schedule whose kwargs were edited into nonsense: say so (once an hour), do nothing."""
    logger.error("%s not run: %s", task_name, exc)
    alert_send(
        title=_("%(task)s not run: bad arguments") % {"task": task_name},
        body=_("%(error)s. Fix the schedule's kwargs in the admin (Periodic tasks).") % {"error": exc},
        level="error",
        key=f"tokens:bad-arguments:{task_name}",
    )


def _dispatch_batch(batch_id: int) -> None:
    refresh_batch.delay(batch_id)


@shared_task(name="tokens.refresh_tokens", ignore_result=True)
def refresh_tokens(
    max_age_days: int | None = None,
    trigger: str = RunTrigger.BEAT,
    token_ids: list[int] | None = None,
) -> int | None:
    """Start a refresh run and fan its batches out to the workers. Returns the run id."""
    try:
        run = token_refresh_start(
            trigger=trigger, max_age_days=max_age_days, token_ids=token_ids, dispatch=_dispatch_batch
        )
    except RefreshAlreadyRunning as exc:
        logger.warning("refresh run skipped: %s", exc)
        return None
    except InvalidRunArguments as exc:
        _refuse("tokens.refresh_tokens", exc)
        return None
    return run.pk


@shared_task(
    name="tokens.refresh_batch",
    ignore_result=True,
    autoretry_for=(redis.ConnectionError, OperationalError),
    retry_backoff=5,
    retry_backoff_max=300,
    max_retries=10,
)
def refresh_batch(batch_id: int) -> bool:
    """Check one batch of a run, then go on with its run's pending batches for a while (overlapped,
    see ``token_refresh_batch``); a done or claimed batch, or a closed run, is a no-op (safe to redeliver)."""
    return token_refresh_batch(
        batch_id=batch_id, drain_seconds=BATCH_DRAIN_SECONDS, keep_draining=lambda: not _shutting_down.is_set()
    )


# Set when this worker begins its warm shutdown (SIGTERM): a draining batch task then takes no
# further batch, finishes what it holds and returns, so `docker stop` does not have to kill it.
# Prefork pool children do not see the signal; they stop draining when BATCH_DRAIN_SECONDS ends
# (the compose file gives workers a stop grace period longer than that).
_shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_kwargs: object) -> None:
    _shutting_down.set()


@shared_task(name="tokens.cleanup_tokens", ignore_result=True)
def cleanup_tokens(days: int = 30, trigger: str = RunTrigger.BEAT) -> int | None:
    """Delete tokens unused for ``days`` days (see ``tokens_stale``). Returns the run id."""
    try:
        return token_cleanup_run(days=days, trigger=trigger).pk
    except CleanupAlreadyRunning as exc:
        logger.warning("cleanup run skipped: %s", exc)
        return None
    except InvalidRunArguments as exc:
        _refuse("tokens.cleanup_tokens", exc)
        return None


@shared_task(name="tokens.sweep_runs", ignore_result=True)
def sweep_runs() -> None:
    """Re-send lost batches of live refresh runs; close runs nobody works any more."""
    refresh_runs_sweep(dispatch=_dispatch_batch)


def _schedule_qr_poll(login_id: str, tick: int) -> None:
    qr_login_poll.apply_async(args=[login_id], kwargs={"tick": tick}, countdown=QR_POLL_INTERVAL_SECONDS)


@shared_task(name="tokens.qr_login_poll", ignore_result=True)
def qr_login_poll(login_id: str, tick: int = 0) -> None:
    """One step of a QR login (fetch the code, or poll ``pc_login`` once), then the next tick in
    about a second while the login is open. Short steps, not a loop, so a single worker keeps
    serving refresh batches meanwhile; a duplicate message finds its tick taken and does nothing."""
    qr_login_tick(login_id=login_id, tick=tick, schedule_next=_schedule_qr_poll)
