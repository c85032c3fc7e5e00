"""Delete tokens unused for N days: one core function for the command, the task and the admin."""

from __future__ import annotations

import logging
import time
import uuid

from django.conf import settings
from django.db import DatabaseError

from leasesite.locks import lock_acquire, lock_holder, lock_release, lock_renew
from tokens import reporting
from tokens.models import DeletionReason, RefreshRun, RunKind, RunStatus
from tokens.selectors import refresh_run_latest_evidence, tokens_stale
from tokens.services.deletion import tokens_delete
from tokens.services.runs import run_close, run_days_validate

logger = logging.getLogger(__name__)

# The latest refresh ended like this: the upstream could not vouch for the tokens.
UNREACHED_STATUSES = (RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.ABANDONED)
CLEANUP_LOCK_NAME = "tokens.cleanup"


class CleanupAlreadyRunning(Exception):  # noqa: N818 - reads as a state, not an error
    """Another cleanup run holds the lock (a second beat, a redelivered message, the command)."""


def cleanup_blocked_reason() -> str:
    """Why cleanup must not delete now, or "" when it may.

    While the latest refresh could not reach the upstream (failed, interrupted, abandoned), did
    not trust its answers (breaker tripped) or confirmed no token valid, the tokens it kept from
    being refreshed look unused: deleting them would turn our outage into their death.
    """
    latest = refresh_run_latest_evidence()
    if latest is None:
        return ""
    if latest.status in UNREACHED_STATUSES:
        return f"the latest refresh run #{latest.pk} ended {latest.status}: the upstream could not vouch for the tokens"
    if latest.status == RunStatus.TRIPPED:
        return (
            f"the latest refresh run #{latest.pk} tripped the circuit breaker: the upstream's answers are not trusted"
        )
    if latest.ok == 0:
        return f"the latest refresh run #{latest.pk} confirmed no token valid: the upstream vouched for nothing"
    return ""


def token_cleanup_run(*, days: int, trigger: str, dry_run: bool = False) -> RefreshRun:
    """Delete (in batches, with audit records) the tokens ``tokens_stale(days)`` selects — or
    nothing, as a ``skipped`` run, while ``cleanup_blocked_reason()`` says so.

    Raises ``InvalidRunArguments`` (a ValueError) for a ``days`` it cannot work with, and
    ``CleanupAlreadyRunning`` while another cleanup run holds the lock: two runs at once (the
    same task delivered twice, two beats) record one run, not two that share the deletions. A
    dry run takes no lock (it deletes nothing). Deleters also claim rows with SKIP LOCKED, so
    each token is audited once even if a stalled run's lock was taken over.
    """
    days = run_days_validate(days, name="days")
    if dry_run:
        return _cleanup_run(days=days, trigger=trigger, dry_run=True, owner="")
    owner = uuid.uuid4().hex
    ttl = settings.BAOMING_RUN_LOCK_TTL
    if not lock_acquire(name=CLEANUP_LOCK_NAME, owner=owner, ttl_seconds=ttl):
        holder = lock_holder(name=CLEANUP_LOCK_NAME)
        until = reporting.format_time(holder.expires_at) if holder else "?"
        raise CleanupAlreadyRunning(f"another cleanup run is in progress (lock held until {until} unless renewed)")
    try:
        return _cleanup_run(days=days, trigger=trigger, dry_run=False, owner=owner)
    finally:
        lock_release(name=CLEANUP_LOCK_NAME, owner=owner)


def _cleanup_run(*, days: int, trigger: str, dry_run: bool, owner: str) -> RefreshRun:
    blocked = cleanup_blocked_reason()
    stale = tokens_stale(days=days)
    planned = 0 if blocked else stale.count()
    run = RefreshRun.objects.create(
        kind=RunKind.CLEANUP, trigger=trigger, cleanup_days=days, dry_run=dry_run, planned=planned
    )
    reporting.log_run_header(
        run_id=run.pk,
        kind=RunKind.CLEANUP,
        trigger=trigger,
        planned=planned,
        max_age_days=None,
        cleanup_days=days,
        dry_run=dry_run,
    )
    if blocked:
        reporting.log_cleanup_skipped(reason=blocked)
        logger.warning("cleanup run #%s skipped: %s", run.pk, blocked)
        return run_close(run, status=RunStatus.SKIPPED, deleted=0, error=f"skipped: {blocked}")
    reason = f"unused for more than {days} days"
    try:
        if dry_run:
            deleted = 0
            tokens = stale.order_by("id").only("card_name", "user_name", "token").iterator(chunk_size=500)
            for deleted, token in enumerate(tokens, start=1):  # noqa: B007 - the count is what we keep
                reporting.log_deleted_line(
                    card_name=token.card_name,
                    user_name=token.user_name,
                    masked=token.masked_token,
                    reason=f"[dry-run] {reason}",
                )
        else:
            ttl = settings.BAOMING_RUN_LOCK_TTL
            renew_every = min(30.0, ttl / 3)
            renewed_at = time.monotonic()

            def log_deleted(record) -> None:
                nonlocal renewed_at
                reporting.log_deleted_line(
                    card_name=record.card_name, user_name=record.user_name, masked=record.token_masked, reason=reason
                )
                if time.monotonic() - renewed_at >= renew_every:  # a long run keeps its lock
                    renewed_at = time.monotonic()
                    if not lock_renew(name=CLEANUP_LOCK_NAME, owner=owner, ttl_seconds=ttl):
                        logger.warning("cleanup run #%s lost its lock; deleting on (SKIP LOCKED audits once)", run.pk)

            deleted = tokens_delete(
                queryset=tokens_stale(days=days),
                reason=DeletionReason.STALE,
                run=run,
                detail=reason,
                on_deleted=log_deleted,
            )
        status, error = RunStatus.SUCCEEDED, ""
    except DatabaseError as exc:
        status, error, deleted = RunStatus.FAILED, f"{type(exc).__name__}: {exc}", None
        run.refresh_from_db()
    if deleted is not None:
        run.total = deleted
    return run_close(run, status=status, deleted=deleted, error=error)
