"""Delete tokens unused for N days: one core function for the command, the task and the admin."""

from __future__ import annotations

import logging

from django.db import DatabaseError

from tokens import reporting
from tokens.models import DeletionReason, RefreshRun, RunKind, RunStatus
from tokens.selectors import refresh_run_latest_evidence, tokens_stale
from tokens.services.deletion import tokens_delete
from tokens.services.runs import run_close, run_days_validate

logger = logging.getLogger(__name__)

# The latest refresh ended like this: the upstream could not vouch for the tokens.
UNREACHED_STATUSES = (RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.ABANDONED)


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

    Raises ``InvalidRunArguments`` (a ValueError) for a ``days`` it cannot work with. Safe to
    run twice at once: deleters claim rows with SKIP LOCKED, so each token is audited once.
    """
    days = run_days_validate(days, name="days")
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

            def log_deleted(record) -> None:
                reporting.log_deleted_line(
                    card_name=record.card_name, user_name=record.user_name, masked=record.token_masked, reason=reason
                )

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
