"""Delete tokens unused for N days: one core function for the command, the task and the admin."""

from __future__ import annotations

from django.db import DatabaseError

from tokens import reporting
from tokens.models import DeletionReason, RefreshRun, RunKind, RunStatus
from tokens.selectors import tokens_stale
from tokens.services.deletion import tokens_delete
from tokens.services.runs import run_close


def token_cleanup_run(*, days: int, trigger: str, dry_run: bool = False) -> RefreshRun:
    """Delete (in batches, with audit records) tokens whose last activity is older than ``days``.

    Safe to run twice at once: deleters claim rows with SKIP LOCKED, so each token is audited once.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    stale = tokens_stale(days=days)
    planned = stale.count()
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
