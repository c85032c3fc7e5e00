"""Token refresh runs: select, fan out in batches, check under one shared rate limit, record.

A run is a ``RefreshRun`` row plus ``RefreshBatch`` rows (slices of token ids). Each batch is
checked by ``token_refresh_batch`` — in-process (the command) or as one Celery task per batch
(``tokens.refresh_tokens`` fans out), so any number of workers share the work while the Redis
rate limiter keeps all of them together under ``BAOMING_RATE_LIMIT``. The last batch to finish
finalizes the run.

Deletion of tokens that answered "invalid" is deferred to the end of the run: only then is the
whole run's share of invalid answers known, and the circuit breaker can keep them all when an
upstream outage answers "invalid" for everything.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from leasesite.crypto import SecretDecryptionError
from leasesite.locks import lock_acquire, lock_holder, lock_release, lock_renew
from leasesite.log_filters import scrub_secrets
from leasesite.notify import alert_send
from leasesite.ratelimit import RateLimiter, get_rate_limiter
from tokens import reporting
from tokens.clients import BaomingClient, CheckOutcome, CheckResult, get_baoming_client
from tokens.models import (
    BaomingToken,
    BatchStatus,
    DeletionReason,
    RefreshBatch,
    RefreshRun,
    RunKind,
    RunStatus,
)
from tokens.selectors import tokens_for_refresh
from tokens.services.deletion import tokens_delete
from tokens.services.runs import REFRESH_LOCK_NAME, run_close

logger = logging.getLogger(__name__)

LOCK_RENEW_EVERY_SECONDS = 30.0
BREAKER_KEPT_MESSAGE = "invalid answer ignored: circuit breaker tripped"


class RefreshAlreadyRunning(Exception):  # noqa: N818 - reads as a state, not an error
    """Another refresh run holds the lock."""


@dataclass(frozen=True)
class TokenCheck:
    token_id: int
    result: CheckResult
    rate_limited_answers: int


@dataclass(frozen=True)
class _TokenRow:
    id: int
    card_name: str
    user_name: str
    token: str | None
    last_used: datetime | None
    decrypt_error: bool = False


# --- checking ---------------------------------------------------------------------------------


def token_check(
    *,
    token: str,
    client: BaomingClient,
    limiter: RateLimiter,
    rate_limit_retries: int,
) -> tuple[CheckResult, int]:
    """Check one token under the shared limiter; on a throttle answer back off and retry.

    Returns the final result and how many rate-limit answers were seen on the way.
    """
    throttled = 0
    while True:
        limiter.acquire()
        result = client.check_token(token)
        if result.outcome != CheckOutcome.RATE_LIMITED:
            return result, throttled
        throttled += 1
        if throttled > rate_limit_retries:
            return result, throttled
        # Honour Retry-After; without one, back off exponentially. The pause applies to every
        # worker sharing the limiter, since the upstream throttles us as a whole.
        backoff = result.retry_after if result.retry_after is not None else min(2.0**throttled, 60.0)
        limiter.pause(backoff)


_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_size = 0


def _get_executor() -> ThreadPoolExecutor:
    """One bounded thread pool per process (created lazily, so after a prefork fork)."""
    global _executor, _executor_size
    with _executor_lock:
        if _executor is None or _executor_size != settings.BAOMING_CONCURRENCY:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor_size = settings.BAOMING_CONCURRENCY
            _executor = ThreadPoolExecutor(max_workers=_executor_size, thread_name_prefix="baoming-check")
        return _executor


def _load_rows(token_ids: list[int]) -> list[_TokenRow]:
    fields = ("id", "card_name", "user_name", "token", "last_used")
    order = {token_id: index for index, token_id in enumerate(token_ids)}
    try:
        loaded = [
            _TokenRow(t.id, t.card_name, t.user_name, t.token, t.last_used)
            for t in BaomingToken.objects.filter(id__in=token_ids).only(*fields)
        ]
    except SecretDecryptionError:
        # One undecryptable row must not sink the batch: load row by row and flag the bad ones.
        loaded = []
        for token_id in token_ids:
            try:
                t = BaomingToken.objects.only(*fields).filter(id=token_id).first()
            except SecretDecryptionError:
                meta = BaomingToken.objects.filter(id=token_id).values("card_name", "user_name", "last_used").first()
                if meta:
                    loaded.append(
                        _TokenRow(token_id, meta["card_name"], meta["user_name"], None, meta["last_used"], True)
                    )
                continue
            if t is not None:
                loaded.append(_TokenRow(t.id, t.card_name, t.user_name, t.token, t.last_used))
    return sorted(loaded, key=lambda row: order.get(row.id, 0))


def _submit_checks(
    rows: list[_TokenRow], *, client: BaomingClient, limiter: RateLimiter
) -> tuple[dict[Future, int], dict[int, TokenCheck]]:
    """Queue every row's check on the process pool; undecryptable rows fail at once."""
    retries = settings.BAOMING_RATE_LIMIT_RETRIES
    executor = _get_executor()
    futures: dict[Future, int] = {}
    failed_early: dict[int, TokenCheck] = {}
    for row in rows:
        if row.decrypt_error or not row.token:
            failed_early[row.id] = TokenCheck(
                row.id, CheckResult(CheckOutcome.TRANSIENT, "cannot decrypt token (encryption key missing?)"), 0
            )
            continue
        future = executor.submit(
            token_check, token=row.token, client=client, limiter=limiter, rate_limit_retries=retries
        )
        futures[future] = row.id
    return futures, failed_early


def _collect_checks(
    futures: dict[Future, int],
    checks: dict[int, TokenCheck],
    *,
    heartbeat: Callable[[], None],
    on_progress: Callable[[int], None] | None,
) -> dict[int, TokenCheck]:
    last_beat = time.monotonic()
    for future in as_completed(futures):
        token_id = futures[future]
        try:
            result, throttled = future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the limiter's Redis went away
            result, throttled = CheckResult(CheckOutcome.TRANSIENT, f"check aborted: {type(exc).__name__}"), 0
            logger.warning("token %s check aborted: %s", token_id, type(exc).__name__)
        checks[token_id] = TokenCheck(token_id, result, throttled)
        if on_progress is not None:
            on_progress(1)
        if time.monotonic() - last_beat >= LOCK_RENEW_EVERY_SECONDS:
            heartbeat()
            last_beat = time.monotonic()
    return checks


# --- recording --------------------------------------------------------------------------------


def _record_checks(*, run: RefreshRun, batch: RefreshBatch, checks: Iterable[TokenCheck]) -> bool:
    """Write a batch's results with a few batched UPDATEs; False if the batch was already done."""
    by_outcome: dict[CheckOutcome, list[int]] = defaultdict(list)
    failures_by_message: dict[str, list[int]] = defaultdict(list)
    invalid_by_message: dict[str, list[int]] = defaultdict(list)
    throttled = 0
    for check in checks:
        outcome = check.result.outcome
        throttled += check.rate_limited_answers
        if outcome == CheckOutcome.RATE_LIMITED:
            outcome = CheckOutcome.TRANSIENT  # still throttled after every retry: keep, count failed
        by_outcome[outcome].append(check.token_id)
        if outcome == CheckOutcome.TRANSIENT:
            failures_by_message[check.result.message[:500]].append(check.token_id)
        elif outcome == CheckOutcome.INVALID:
            invalid_by_message[f"invalid: {check.result.message}"[:500]].append(check.token_id)

    now = timezone.now()
    with transaction.atomic():
        if not RefreshBatch.objects.filter(pk=batch.pk, status=BatchStatus.PENDING).update(status=BatchStatus.DONE):
            return False
        if not run.dry_run:
            tokens = BaomingToken.objects
            if by_outcome[CheckOutcome.VALID]:
                tokens.filter(id__in=by_outcome[CheckOutcome.VALID]).update(
                    last_used=now, last_checked_at=now, consecutive_failures=0, last_error="", invalid_in_run=None
                )
            for message, ids in invalid_by_message.items():
                tokens.filter(id__in=ids).update(last_checked_at=now, last_error=message, invalid_in_run=run.pk)
            for message, ids in failures_by_message.items():
                tokens.filter(id__in=ids).update(
                    last_checked_at=now,
                    consecutive_failures=F("consecutive_failures") + 1,
                    last_error=message,
                    invalid_in_run=None,
                )
        checked = sum(len(ids) for ids in by_outcome.values())
        RefreshRun.objects.filter(pk=run.pk).update(
            total=F("total") + checked,
            ok=F("ok") + len(by_outcome[CheckOutcome.VALID]),
            invalid=F("invalid") + len(by_outcome[CheckOutcome.INVALID]),
            failed=F("failed") + len(by_outcome[CheckOutcome.TRANSIENT]),
            rate_limited=F("rate_limited") + throttled,
            batches_done=F("batches_done") + 1,
        )
    return True


def _breaker_should_trip(*, ok: int, invalid: int) -> bool:
    answers = ok + invalid
    if answers < settings.BAOMING_BREAKER_MIN_ANSWERS:
        return False
    return invalid / answers > settings.BAOMING_BREAKER_THRESHOLD


def _evaluate_breaker(run_id: int) -> None:
    run = RefreshRun.objects.only("ok", "invalid", "breaker_tripped").get(pk=run_id)
    if run.breaker_tripped or not _breaker_should_trip(ok=run.ok, invalid=run.invalid):
        return
    if RefreshRun.objects.filter(pk=run_id, breaker_tripped=False).update(breaker_tripped=True):
        alert_send(
            title="报名工具 token refresh: circuit breaker tripped",
            body=(
                f"Run #{run_id}: {run.invalid} of {run.ok + run.invalid} answers said "
                f"'invalid access_token' (threshold {settings.BAOMING_BREAKER_THRESHOLD:.0%}). "
                "No token will be deleted by this run; check the upstream before the next run."
            ),
            level="error",
        )


# --- run lifecycle ----------------------------------------------------------------------------


def token_refresh_start(
    *,
    trigger: str,
    max_age_days: int | None = None,
    token_ids: list[int] | None = None,
    dry_run: bool = False,
    batch_size: int | None = None,
    dispatch: Callable[[int], None] | None = None,
) -> RefreshRun:
    """Take the run lock, create the run and its batches; ``dispatch(batch_id)`` after commit.

    Raises ``RefreshAlreadyRunning`` when another run holds the lock. A dry run takes no lock
    (it writes nothing to tokens).
    """
    batch_size = batch_size or settings.BAOMING_BATCH_SIZE
    owner = uuid.uuid4().hex
    if not dry_run:
        if not lock_acquire(name=REFRESH_LOCK_NAME, owner=owner, ttl_seconds=settings.BAOMING_RUN_LOCK_TTL):
            holder = lock_holder(name=REFRESH_LOCK_NAME)
            until = reporting.format_time(holder.expires_at) if holder else "?"
            raise RefreshAlreadyRunning(f"another refresh run is in progress (lock held until {until} unless renewed)")
        # We hold the lock, so any run still marked running lost its workers: close it.
        RefreshRun.objects.filter(
            kind=RunKind.REFRESH, dry_run=False, status__in=[RunStatus.RUNNING, RunStatus.FINALIZING]
        ).update(
            status=RunStatus.ABANDONED,
            ended_at=timezone.now(),
            error="abandoned: its workers stopped renewing the lock",
        )
    try:
        with transaction.atomic():
            run = RefreshRun.objects.create(
                kind=RunKind.REFRESH, trigger=trigger, max_age_days=max_age_days, dry_run=dry_run, lock_owner=owner
            )
            planned = 0
            number = 0
            pending: list[RefreshBatch] = []
            chunk: list[int] = []
            selected = tokens_for_refresh(max_age_days=max_age_days)
            if token_ids is not None:
                selected = selected.filter(id__in=token_ids)
            ids = selected.values_list("id", flat=True)
            for token_id in ids.iterator(chunk_size=2000):
                chunk.append(token_id)
                if len(chunk) == batch_size:
                    pending.append(RefreshBatch(run=run, number=number, token_ids=chunk))
                    number, planned, chunk = number + 1, planned + len(chunk), []
                    if len(pending) >= 100:
                        RefreshBatch.objects.bulk_create(pending)
                        pending = []
            if chunk:
                pending.append(RefreshBatch(run=run, number=number, token_ids=chunk))
                number, planned = number + 1, planned + len(chunk)
            RefreshBatch.objects.bulk_create(pending)
            run.planned, run.batches_total, run.batch_size = planned, number, batch_size
            run.save(update_fields=["planned", "batches_total", "batch_size"])
            if dispatch is not None and number:
                batch_ids = list(run.batches.order_by("number").values_list("id", flat=True))

                def dispatch_all() -> None:
                    for batch_id in batch_ids:
                        dispatch(batch_id)

                transaction.on_commit(dispatch_all)
    except BaseException:
        if not dry_run:
            lock_release(name=REFRESH_LOCK_NAME, owner=owner)
        raise
    reporting.log_run_header(
        run_id=run.pk,
        kind=RunKind.REFRESH,
        trigger=trigger,
        planned=planned,
        max_age_days=max_age_days,
        dry_run=dry_run,
    )
    if number == 0:
        _finalize_if_complete(run.pk)
        run.refresh_from_db()
    return run


@dataclass
class _BatchInFlight:
    batch: RefreshBatch
    run: RefreshRun
    rows: list[_TokenRow]
    futures: dict[Future, int]
    checks: dict[int, TokenCheck]

    def heartbeat(self) -> None:
        if not self.run.dry_run:
            lock_renew(name=REFRESH_LOCK_NAME, owner=self.run.lock_owner, ttl_seconds=settings.BAOMING_RUN_LOCK_TTL)


def _batch_begin(*, batch_id: int, client: BaomingClient | None, limiter: RateLimiter | None) -> _BatchInFlight | None:
    """Load a batch and queue its checks; None when there is nothing to do."""
    batch = RefreshBatch.objects.select_related("run").filter(pk=batch_id).first()
    if batch is None or batch.status == BatchStatus.DONE or batch.run.is_final:
        return None
    client = client or get_baoming_client()
    limiter = limiter or get_rate_limiter(name="baoming", rate=settings.BAOMING_RATE_LIMIT)
    rows = _load_rows(list(batch.token_ids))
    futures, checks = _submit_checks(rows, client=client, limiter=limiter)
    inflight = _BatchInFlight(batch=batch, run=batch.run, rows=rows, futures=futures, checks=checks)
    inflight.heartbeat()
    return inflight


def _batch_finish(inflight: _BatchInFlight, *, on_progress: Callable[[int], None] | None) -> bool:
    """Wait for a batch's checks, record them, log them; maybe trip the breaker or finish the run."""
    run, rows = inflight.run, inflight.rows
    checks = _collect_checks(inflight.futures, inflight.checks, heartbeat=inflight.heartbeat, on_progress=on_progress)
    if not _record_checks(run=run, batch=inflight.batch, checks=checks.values()):
        return False
    inflight.heartbeat()
    base_index = inflight.batch.number * run.batch_size
    for offset, row in enumerate(rows, start=1):
        check = checks[row.id]
        reporting.log_token_line(
            index=base_index + offset,
            planned=run.planned,
            card_name=row.card_name,
            user_name=row.user_name,
            last_used=row.last_used,
            outcome=check.result.outcome,
            message=check.result.message,
        )
        logger.debug(
            "token %s: %s http=%s %.3fs %s",
            row.id,
            check.result.outcome,
            check.result.http_status,
            check.result.elapsed,
            check.result.message,
        )
    _evaluate_breaker(run.pk)
    _finalize_if_complete(run.pk)
    return True


def token_refresh_batch(
    *,
    batch_id: int,
    client: BaomingClient | None = None,
    limiter: RateLimiter | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> bool:
    """Check one batch and record it; idempotent (a done batch or a closed run is skipped)."""
    inflight = _batch_begin(batch_id=batch_id, client=client, limiter=limiter)
    if inflight is None:
        return False
    return _batch_finish(inflight, on_progress=on_progress)


def _finalize_if_complete(run_id: int) -> None:
    claimed = RefreshRun.objects.filter(pk=run_id, status=RunStatus.RUNNING, batches_done=F("batches_total")).update(
        status=RunStatus.FINALIZING
    )
    if claimed:
        token_refresh_finalize(run_id=run_id)


def token_refresh_finalize(*, run_id: int) -> RefreshRun:
    """Delete (or, if the breaker tripped, keep) the invalid tokens; close the run; release the lock."""
    run = RefreshRun.objects.get(pk=run_id)
    flagged = BaomingToken.objects.filter(invalid_in_run=run)
    deleted = 0
    if run.dry_run:
        deleted = run.invalid  # what would have been deleted
    elif run.breaker_tripped:
        flagged.update(
            invalid_in_run=None, consecutive_failures=F("consecutive_failures") + 1, last_error=BREAKER_KEPT_MESSAGE
        )
    else:

        def log_deleted(record) -> None:
            reporting.log_deleted_line(
                card_name=record.card_name, user_name=record.user_name, masked=record.token_masked, reason=record.detail
            )

        deleted = tokens_delete(queryset=flagged, reason=DeletionReason.INVALID, run=run, on_deleted=log_deleted)
    run.refresh_from_db()
    if run.breaker_tripped:
        status = RunStatus.TRIPPED
    elif run.total > 0 and run.ok == 0 and run.invalid == 0:
        status = RunStatus.FAILED  # nothing could be verified: upstream unreachable or broken
        run.error = run.error or "every check failed (upstream unreachable or answering errors)"
    else:
        status = RunStatus.SUCCEEDED
    return run_close(run, status=status, deleted=deleted)


def token_refresh_abort(*, run_id: int, error: str) -> RefreshRun | None:
    """Mark an unfinished run failed (the in-process runner was interrupted or crashed)."""
    claimed = RefreshRun.objects.filter(pk=run_id, status__in=[RunStatus.RUNNING, RunStatus.FINALIZING]).update(
        status=RunStatus.FAILED
    )
    if not claimed:
        return None
    # Tokens flagged invalid by this run are kept: the run did not finish, so it decides nothing.
    BaomingToken.objects.filter(invalid_in_run_id=run_id).update(invalid_in_run=None)
    return run_close(RefreshRun.objects.get(pk=run_id), status=RunStatus.FAILED, error=error)


def token_refresh_run(
    *,
    trigger: str,
    max_age_days: int | None = None,
    token_ids: list[int] | None = None,
    dry_run: bool = False,
    client: BaomingClient | None = None,
    limiter: RateLimiter | None = None,
    on_start: Callable[[RefreshRun], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RefreshRun:
    """A whole refresh run in this process (the command and the benchmark use it)."""
    run = token_refresh_start(trigger=trigger, max_age_days=max_age_days, token_ids=token_ids, dry_run=dry_run)
    if on_start is not None:
        on_start(run)
    try:
        batch_ids = list(run.batches.filter(status=BatchStatus.PENDING).order_by("number").values_list("id", flat=True))
        for batch_id in batch_ids:
            token_refresh_batch(batch_id=batch_id, client=client, limiter=limiter, on_progress=on_progress)
    except BaseException as exc:
        token_refresh_abort(run_id=run.pk, error=scrub_secrets(f"interrupted: {type(exc).__name__}: {exc}"))
        raise
    run.refresh_from_db()
    return run
