"""Celery tasks: thin shells over ``tokens.services``. They take ids, never tokens."""

from __future__ import annotations

import logging

import redis
from celery import shared_task
from django.db import OperationalError

from tokens.models import RunTrigger
from tokens.services.cleanup import token_cleanup_run
from tokens.services.refresh import RefreshAlreadyRunning, token_refresh_batch, token_refresh_start

logger = logging.getLogger(__name__)


@shared_task(name="tokens.refresh_tokens", ignore_result=True)
def refresh_tokens(
    max_age_days: int | None = None,
    trigger: str = RunTrigger.BEAT,
    token_ids: list[int] | None = None,
) -> int | None:
    """Start a refresh run and fan its batches out to the workers. Returns the run id."""
    try:
        run = token_refresh_start(
            trigger=trigger,
            max_age_days=max_age_days,
            token_ids=token_ids,
            dispatch=lambda batch_id: refresh_batch.delay(batch_id),
        )
    except RefreshAlreadyRunning as exc:
        logger.warning("refresh run skipped: %s", exc)
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
    """Check one batch of a run; a done batch or a closed run is a no-op (safe to redeliver)."""
    return token_refresh_batch(batch_id=batch_id)


@shared_task(name="tokens.cleanup_tokens", ignore_result=True)
def cleanup_tokens(days: int = 30, trigger: str = RunTrigger.BEAT) -> int:
    """Delete tokens unused for ``days`` days. Returns the run id."""
    return token_cleanup_run(days=days, trigger=trigger).pk
