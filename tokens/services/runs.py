"""Closing a run (refresh or cleanup): the one place that stamps its end, logs its statistics
block, releases its lock and alerts on failure."""

from __future__ import annotations

from django.utils import timezone

from leasesite.locks import lock_release
from leasesite.notify import alert_send
from tokens import reporting
from tokens.models import RefreshRun, RunStatus

REFRESH_LOCK_NAME = "tokens.refresh"


def run_close(run: RefreshRun, *, status: str, deleted: int | None = None, error: str = "") -> RefreshRun:
    now = timezone.now()
    run.status = status
    run.ended_at = now
    run.duration_seconds = (now - run.started_at).total_seconds()
    if deleted is not None:
        run.deleted = deleted
    if error:
        run.error = error[:2000]
    run.save(update_fields=["status", "ended_at", "duration_seconds", "total", "deleted", "error"])
    if not run.dry_run and run.lock_owner:
        lock_release(name=REFRESH_LOCK_NAME, owner=run.lock_owner)
    reporting.log_run_statistics(
        kind=run.kind,
        status_label=str(run.get_status_display()),
        total=run.total,
        ok=run.ok,
        failed=run.failed,
        invalid=run.invalid,
        deleted=run.deleted,
        rate_limited=run.rate_limited,
        duration=run.duration_seconds or 0.0,
        breaker_tripped=run.breaker_tripped,
        dry_run=run.dry_run,
    )
    if status == RunStatus.FAILED:
        alert_send(title=f"报名工具 token {run.kind} failed", body=f"Run #{run.pk}: {run.error}", level="error")
    return run
