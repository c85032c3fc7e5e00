"""Closing a run (refresh or cleanup): the one place that stamps its end, logs its statistics
block, releases its lock and alerts when it ended badly. Also the checks of a run's arguments,
shared by the commands' callers (Celery kwargs edited in the admin, Python callers)."""

from __future__ import annotations

import logging
import math

from django.utils import timezone
from django.utils.translation import gettext as _

from leasesite.cli import MAX_DAYS
from leasesite.locks import lock_release
from leasesite.notify import alert_is_active, alert_problem, alert_resolved, alert_send
from tokens import reporting
from tokens.models import LIVE_RUN_STATUSES, BaomingToken, RefreshRun, RunStatus, TokenDeletion

logger = logging.getLogger(__name__)

REFRESH_LOCK_NAME = "tokens.refresh"
# Statuses that tell people something went wrong (dry runs never alert: they only report). A
# failed run alerts once while runs keep failing (``run_failing_alert_key``); the others each time.
ALERTING_STATUSES = (RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.ABANDONED)


class InvalidRunArguments(ValueError):  # noqa: N818 - reads as what the caller passed
    """A run was asked for with arguments it cannot work with (the message says which)."""


def _describe(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        # str() of a 5000-digit number raises ValueError (Python's digit limit): estimate instead.
        return f"a number of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    return repr(value)[:40]


def run_days_validate(value: object, *, name: str) -> int:
    """A number of days as the services accept it: a whole number in [1, MAX_DAYS].

    Celery kwargs come from JSON an operator can edit in the admin, so a string, a float or an
    enormous number must be a clear error here, not an OverflowError deep in a date computation.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DAYS:
        raise InvalidRunArguments(f"{name} must be a whole number between 1 and {MAX_DAYS}, got {_describe(value)}")
    return value


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
        lock_release(name=REFRESH_LOCK_NAME, owner=run.lock_owner)  # a no-op if another run holds it
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
        error=run.error if status != RunStatus.SUCCEEDED else "",
    )
    if run.dry_run:
        return run
    names = {"kind": run.get_kind_display(), "run": run.pk}
    if status == RunStatus.FAILED:
        # A state that lasts (the upstream is down: every run fails until it is back): alert when
        # it starts, not once per run, and say "resolved" at the next run that succeeds.
        alert_problem(
            key=run_failing_alert_key(run.kind),
            title=_("报名工具 token %(kind)s run #%(run)s failed") % names,
            body=_("Run #%(run)s: %(error)s") % {"run": run.pk, "error": run.error},
            level="error",
        )
    elif status in ALERTING_STATUSES:
        titles = {
            RunStatus.INTERRUPTED: _("报名工具 token %(kind)s run #%(run)s interrupted"),
            RunStatus.ABANDONED: _("报名工具 token %(kind)s run #%(run)s abandoned"),
        }
        alert_send(
            title=titles[status] % names,
            body=_("Run #%(run)s: %(error)s") % {"run": run.pk, "error": run.error},
            level="error",
        )
    elif status == RunStatus.SUCCEEDED and alert_is_active(run_failing_alert_key(run.kind)):  # one cheap query
        alert_resolved(
            key=run_failing_alert_key(run.kind),
            title=_("报名工具 token %(kind)s runs failing") % names,
            body=_("Run #%(run)s succeeded.") % names,
        )
    return run


def run_failing_alert_key(kind: str) -> str:
    """The alert of runs of ``kind`` that keep failing (one problem however many runs it lasts)."""
    return f"tokens:{kind}:failing"


def run_end_unfinished(*, run_id: int, status: str, error: str) -> RefreshRun | None:
    """End a run that is still live as ``status`` (interrupted, failed or abandoned).

    The one way an unfinished run ends: whoever wins the compare-and-swap closes it (and
    alerts); tokens it flagged invalid are kept, since an unfinished run decides nothing.
    Returns None when the run was no longer live.
    """
    claimed = RefreshRun.objects.filter(pk=run_id, status__in=LIVE_RUN_STATUSES).update(status=status)
    if not claimed:
        return None
    BaomingToken.objects.filter(invalid_in_run_id=run_id).update(invalid_in_run=None)
    run = RefreshRun.objects.get(pk=run_id)
    # Deletions already made by an interrupted finalization stay (each has its audit record).
    deleted = TokenDeletion.objects.filter(run_id=run_id).count()
    logger.warning("run #%s ended %s: %s", run_id, status, error)
    return run_close(run, status=status, deleted=deleted, error=error)


def run_heartbeat(*, run_id: int) -> bool:
    """Stamp a live run's sign of life; False when the run is no longer running."""
    return bool(RefreshRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(heartbeat_at=timezone.now()))
