"""Token refresh runs: select, fan out in batches, check under one shared rate limit, record.

A run is a ``RefreshRun`` row plus ``RefreshBatch`` rows (slices of token ids). Each batch is
checked by ``token_refresh_batch`` — in-process (the command) or as one Celery task per batch
(``tokens.refresh_tokens`` fans out), so any number of workers share the work while the Redis
rate limiter keeps all of them together under ``BAOMING_RATE_LIMIT``. The last batch to finish
finalizes the run.

A batch is claimed (``pending → claimed``) before the upstream is called, so a second delivery of
its message does nothing; whoever works it renews its claim, the run's lock and the run's sign of
life every few seconds — also while every check sleeps on a ``Retry-After`` — and records nothing
once any of them is lost (the run was taken over, abandoned or interrupted).

Deletion of tokens that answered "invalid" — or whose suspect answers ("登录已过期") reached
BAOMING_SUSPECT_LIMIT in a row over at least an hour — is deferred to the end of the run: only
then is the whole run's share of such answers known, and the circuit breaker can keep them all
when an upstream outage answers "invalid" (or "logged out") for everything.

Each recorded batch also writes the per-token check history (``services.history``).

Reaching the limit (README "Reaching the rate limit"): each process keeps
``check_concurrency(...)`` checks in flight — its share of the rate (the limiter counts the
processes taking part) times the measured latency, with a margin, at most BAOMING_CONCURRENCY —
and works its batches overlapped: the next batch is claimed and queued before the current one's
last checks are done, and checked while the current one is recorded. A batch task goes on with its
run's pending batches for up to BATCH_DRAIN_SECONDS.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.translation import gettext as _

from leasesite.crypto import UndecryptableSecret
from leasesite.locks import lock_acquire, lock_holder, lock_release, lock_renew
from leasesite.log_filters import scrub_secrets
from leasesite.notify import alert_problem, alert_resolved
from leasesite.ratelimit import RateLimiter, get_rate_limiter
from tokens import reporting
from tokens.clients import BaomingClient, CheckOutcome, CheckResult, get_baoming_client
from tokens.models import (
    LIVE_RUN_STATUSES,
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
from tokens.services.history import token_history_record
from tokens.services.runs import (
    REFRESH_LOCK_NAME,
    run_close,
    run_days_validate,
    run_end_unfinished,
    run_heartbeat,
)

logger = logging.getLogger(__name__)

LOCK_RENEW_MAX_INTERVAL_SECONDS = 30.0
STOP_POLL_SECONDS = 0.25  # how soon a requested stop (SIGTERM) is noticed while checks run
BREAKER_KEPT_MESSAGE = "invalid answer ignored: circuit breaker tripped"
BREAKER_KEPT_SUSPECT_MESSAGE = "suspect answers over the limit ignored: circuit breaker tripped"
# A suspect streak deletes a token only when its first and last answers are this far apart.
SUSPECT_MIN_SPAN = timedelta(hours=1)
BREAKER_ALERT_KEY = "tokens:breaker"
STOPPED_MESSAGE = "check not made: the batch was stopped"
# Sizing (see check_concurrency): checks in flight per process ≈ rate × latency / workers × this.
CONCURRENCY_SAFETY = 1.5
# The latency assumed before this process measured any check (generous: threads idle if too many).
INITIAL_LATENCY_GUESS_SECONDS = 0.25
SIZING_INTERVAL_SECONDS = 0.25
# A limiter block covers about this many seconds of a process' share of the rate, at most this many slots.
BLOCK_SPAN_SECONDS = 0.05
MAX_BLOCK_SIZE = 16
# A batch task goes on with further pending batches of its run for up to this long (so its worker
# never idles between batches); the messages of those batches then find them done and skip.
BATCH_DRAIN_SECONDS = 60.0


class RefreshAlreadyRunning(Exception):  # noqa: N818 - reads as a state, not an error
    """Another refresh run holds the lock."""


class _BatchOutcome(enum.Enum):
    RECORDED = "recorded"
    SKIPPED = "skipped"  # done, claimed by a live worker, or its run is closed: nothing to do
    LOST = "lost"  # the run was taken over / abandoned, or the claim was lost, while working
    INTERRUPTED = "interrupted"  # a stop was requested (SIGTERM to the command)


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
    fingerprint: str = ""  # which token was checked: the row may hold another one by the time we record


def renew_interval_seconds() -> float:
    """How often a claim and a lock are renewed: well inside their lifetime."""
    return min(LOCK_RENEW_MAX_INTERVAL_SECONDS, settings.BAOMING_RUN_LOCK_TTL / 3)


# --- checking ---------------------------------------------------------------------------------


@dataclass
class CheckPause:
    """A ``Retry-After`` pause as one batch's threads see it, so they wait it out on their stop
    event (which a stop request sets at once) instead of asleep inside the limiter."""

    _until: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def extend(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def remaining(self) -> float:
        return self._until - time.monotonic()


def _stopped_while_paused(stop: threading.Event | None, pause: CheckPause | None) -> bool:
    if stop is None:
        return False
    while pause is not None and (remaining := pause.remaining()) > 0:
        if stop.wait(remaining):
            return True
    return stop.is_set()


def token_check(
    *,
    token: str,
    client: BaomingClient,
    limiter: RateLimiter,
    rate_limit_retries: int,
    stop: threading.Event | None = None,
    pause: CheckPause | None = None,
) -> tuple[CheckResult, int]:
    """Check one token under the shared limiter; on a throttle answer back off and retry.

    Returns the final result and how many rate-limit answers were seen on the way. When ``stop``
    is set the check ends without calling the upstream (its result is never recorded).
    """
    throttled = 0
    while True:
        if _stopped_while_paused(stop, pause):
            return CheckResult(CheckOutcome.TRANSIENT, STOPPED_MESSAGE), throttled
        limiter.acquire()
        if stop is not None and stop.is_set():
            return CheckResult(CheckOutcome.TRANSIENT, STOPPED_MESSAGE), throttled
        result = client.check_token(token)
        if result.outcome != CheckOutcome.RATE_LIMITED:
            return result, throttled
        throttled += 1
        if throttled > rate_limit_retries:
            return result, throttled
        # Honour Retry-After; without one, back off exponentially. The pause applies to every
        # worker sharing the limiter, since the upstream throttles us as a whole.
        backoff = result.retry_after if result.retry_after is not None else min(2.0**throttled, 60.0)
        if pause is not None:
            pause.extend(backoff)
        limiter.pause(backoff)


class CheckPool:
    """A fixed pool of **daemon** threads running checks, handing back ``Future``s.

    Like ``ThreadPoolExecutor``, except that its threads never hold up the exit of the process:
    a check can sleep inside the shared limiter for as long as the upstream's ``Retry-After``
    (up to 300 s), and an interrupted command must still exit at once. The threads hold no
    database connection and no lock, so ending them with the process loses nothing.

    ``size`` threads exist (``BAOMING_CONCURRENCY``, the upper bound); at most ``limit`` of them
    run a check at once (``set_limit``, sized by ``check_concurrency``): the others wait, idle,
    until the limit grows.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: deque[tuple[Future, Callable[..., object], dict]] = deque()
        self._cond = threading.Condition()
        self._limit = size
        self._active = 0
        self._closed = False
        for number in range(size):
            threading.Thread(target=self._work, name=f"baoming-check-{number}", daemon=True).start()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self._limit = max(1, min(self.size, limit))
            self._cond.notify_all()

    def submit(self, fn: Callable[..., object], /, **kwargs: object) -> Future:
        future: Future = Future()
        with self._cond:
            self._items.append((future, fn, kwargs))
            self._cond.notify()
        return future

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                # At most ``limit`` threads take work, in submission order; the others idle here.
                while not self._closed and (not self._items or self._active >= self._limit):
                    self._cond.wait()
                if self._closed:
                    return
                future, fn, kwargs = self._items.popleft()
                self._active += 1
            try:
                if future.set_running_or_notify_cancel():  # False: cancelled while queued
                    try:
                        result = fn(**kwargs)
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                with self._cond:
                    self._active -= 1
                    self._cond.notify()


_pool_lock = threading.Lock()
_pool: CheckPool | None = None


def _get_pool() -> CheckPool:
    """One bounded pool per process (created lazily, so after a prefork fork)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.size != settings.BAOMING_CONCURRENCY:
            if _pool is not None:
                _pool.shutdown()
            _pool = CheckPool(settings.BAOMING_CONCURRENCY)
        return _pool


# --- sizing -----------------------------------------------------------------------------------


def check_concurrency(
    *, rate: float, latency: float, workers: int, upper: int, safety: float = CONCURRENCY_SAFETY
) -> int:
    """Checks one process keeps in flight: its share of the rate times the time one takes.

    ``ceil(rate × latency / workers × safety)`` clamped to ``[1, upper]``: with ``workers``
    processes sharing ``rate`` requests per second, each must have ``rate / workers × latency``
    requests under way to use its share (Little's law); ``safety`` covers the time a check spends
    outside the request (waiting for its slot, classifying) and the spread of latencies.
    """
    if rate <= 0 or latency <= 0:
        return 1
    needed = math.ceil(rate * latency / max(workers, 1) * safety)
    return max(1, min(upper, needed))


def limiter_block_size(*, rate: float, workers: int) -> int:
    """Slots one limiter call reserves: about BLOCK_SPAN_SECONDS of this process' share of the
    rate (so one Redis round trip serves many checks at high rates), 1 at low rates."""
    return max(1, min(MAX_BLOCK_SIZE, int(rate / max(workers, 1) * BLOCK_SPAN_SECONDS)))


@dataclass
class _Sizer:
    """Re-sizes the pool's in-flight limit and the limiter's block from what this process sees:
    the limiter's rate and participants, the client's measured latency."""

    pool: CheckPool
    client: BaomingClient
    limiter: RateLimiter
    next_at: float = 0.0

    def update(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_at:
            return
        self.next_at = now + SIZING_INTERVAL_SECONDS
        participants = getattr(self.limiter, "participants", None)
        workers = participants() if callable(participants) else 1
        latency = getattr(self.client, "latency", None) or INITIAL_LATENCY_GUESS_SECONDS
        rate = self.limiter.rate
        self.pool.set_limit(
            check_concurrency(rate=rate, latency=latency, workers=workers, upper=settings.BAOMING_CONCURRENCY)
        )
        if hasattr(self.limiter, "block_size"):
            self.limiter.block_size = limiter_block_size(rate=rate, workers=workers)


def _load_rows(token_ids: list[int]) -> list[_TokenRow]:
    """The batch's tokens in its order. A token no configured key decrypts loads as an
    ``UndecryptableSecret`` (leasesite.fields) and is flagged: it fails its check at once."""
    fields = ("id", "card_name", "user_name", "token", "last_used", "fingerprint")
    order = {token_id: index for index, token_id in enumerate(token_ids)}
    loaded = [
        _TokenRow(
            t.id,
            t.card_name,
            t.user_name,
            t.token or None,
            t.last_used,
            isinstance(t.token, UndecryptableSecret),
            t.fingerprint,
        )
        for t in BaomingToken.objects.filter(id__in=token_ids).only(*fields)
    ]
    return sorted(loaded, key=lambda row: order.get(row.id, 0))


# --- one batch in flight ----------------------------------------------------------------------


@dataclass
class _BatchInFlight:
    batch: RefreshBatch
    run: RefreshRun
    claim: str
    rows: list[_TokenRow] = field(default_factory=list)
    futures: dict[Future, int] = field(default_factory=dict)
    checks: dict[int, TokenCheck] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    pause: CheckPause = field(default_factory=CheckPause)

    def heartbeat(self) -> str | None:
        """Renew the batch's claim, the run's sign of life and its lock; say why not if we can't."""
        ttl = settings.BAOMING_RUN_LOCK_TTL
        renewed = RefreshBatch.objects.filter(
            pk=self.batch.pk, status=BatchStatus.CLAIMED, claimed_by=self.claim
        ).update(claimed_until=timezone.now() + timedelta(seconds=ttl))
        if not renewed:
            return "lost its claim on the batch"
        if not run_heartbeat(run_id=self.run.pk):
            return "the run is no longer running"
        if not self.run.dry_run and not lock_renew(name=REFRESH_LOCK_NAME, owner=self.run.lock_owner, ttl_seconds=ttl):
            token_refresh_abandon(run_id=self.run.pk, reason="it lost its lock: another run took over")
            return "the run lost its lock"
        return None

    def abort(self) -> None:
        """Stop the batch's checks: queued ones never start, running ones end before asking."""
        self.stop.set()
        for future in self.futures:
            future.cancel()

    def submit(self, *, client: BaomingClient, limiter: RateLimiter, pool: CheckPool) -> None:
        """Queue every row's check on the process pool; undecryptable rows fail at once."""
        retries = settings.BAOMING_RATE_LIMIT_RETRIES
        for row in self.rows:
            if row.decrypt_error or not row.token:
                self.checks[row.id] = TokenCheck(
                    row.id, CheckResult(CheckOutcome.TRANSIENT, "cannot decrypt token (encryption key missing?)"), 0
                )
                continue
            future = pool.submit(
                token_check,
                token=row.token,
                client=client,
                limiter=limiter,
                rate_limit_retries=retries,
                stop=self.stop,
                pause=self.pause,
            )
            self.futures[future] = row.id


def _batch_claim(batch_id: int) -> _BatchInFlight | None:
    """Claim a batch before anything is asked upstream; None when there is nothing to do.

    A compare-and-swap on the batch row: a pending batch, or one whose claim expired (its worker
    died), can be taken; a second delivery of the same message finds it claimed and stops here.
    """
    batch = RefreshBatch.objects.select_related("run").filter(pk=batch_id).first()
    if batch is None or batch.status == BatchStatus.DONE or batch.run.status != RunStatus.RUNNING:
        return None
    claim = uuid.uuid4().hex
    now = timezone.now()
    claimable = Q(status=BatchStatus.PENDING) | Q(status=BatchStatus.CLAIMED, claimed_until__lt=now)
    taken = RefreshBatch.objects.filter(claimable, pk=batch_id).update(
        status=BatchStatus.CLAIMED,
        claimed_by=claim,
        claimed_until=now + timedelta(seconds=settings.BAOMING_RUN_LOCK_TTL),
    )
    if not taken:
        logger.info("batch %s of run #%s is claimed by another worker: skipped", batch.number, batch.run_id)
        return None
    inflight = _BatchInFlight(batch=batch, run=batch.run, claim=claim)
    reason = inflight.heartbeat()
    if reason is not None:
        logger.warning("batch %s of run #%s not worked: %s", batch.number, batch.run_id, reason)
        return None
    return inflight


def _batch_start(
    batch_ids: Iterator[int], *, client: BaomingClient, limiter: RateLimiter, pool: CheckPool, only_next: bool = False
) -> _BatchInFlight | None:
    """Claim the next batch of ``batch_ids`` that can be claimed (``only_next``: the next one or
    none), load its rows and queue its checks; None when the ids ran out."""
    for batch_id in batch_ids:
        inflight = _batch_claim(batch_id)
        if inflight is None:
            if only_next:
                return None
            continue
        try:
            inflight.rows = _load_rows(list(inflight.batch.token_ids))
            inflight.submit(client=client, limiter=limiter, pool=pool)
        except BaseException:
            inflight.abort()
            raise
        return inflight
    return None


def _take_results(inflight: _BatchInFlight, done: set[Future], on_progress: Callable[[int], None] | None) -> None:
    for future in done:
        token_id = inflight.futures[future]
        try:
            result, throttled = future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the limiter's Redis went away
            result, throttled = CheckResult(CheckOutcome.TRANSIENT, f"check aborted: {type(exc).__name__}"), 0
            logger.warning("token %s check aborted: %s", token_id, type(exc).__name__)
        inflight.checks[token_id] = TokenCheck(token_id, result, throttled)
    if on_progress is not None and done:
        on_progress(len(done))


def _batches_work(
    *,
    batch_ids: Iterator[int],
    client: BaomingClient | None,
    limiter: RateLimiter | None,
    on_progress: Callable[[int], None] | None,
    stop_requested: Callable[[], bool] | None,
    first_must_claim: bool = False,
) -> list[_BatchOutcome]:
    """Work the batches of ``batch_ids`` one after another, overlapped; one outcome per batch
    claimed (an empty list when none could be), the last one LOST or INTERRUPTED if the work
    stopped there.

    Overlap: when the current batch has no more than ``2 × in-flight limit`` checks left, the
    next batch is claimed, loaded and queued behind them on the same pool, so the threads go on
    from the current batch's last checks to the next batch's first without a pause, and check
    it while this thread records the current one. Claims, the run's lock and its sign of life
    are renewed on a clock of their own (every check may sleep on a long ``Retry-After``).
    """
    client = client or get_baoming_client()
    limiter = limiter or get_rate_limiter(name="baoming", rate=settings.BAOMING_RATE_LIMIT, participant=True)
    pool = _get_pool()
    join, leave = getattr(limiter, "join", None), getattr(limiter, "leave", None)
    if join is not None:
        join()
    sizer = _Sizer(pool=pool, client=client, limiter=limiter)
    sizer.update(force=True)
    outcomes: list[_BatchOutcome] = []
    # A batch task whose own batch is done or taken does nothing more (a second delivery).
    current = _batch_start(batch_ids, client=client, limiter=limiter, pool=pool, only_next=first_must_claim)
    upcoming: _BatchInFlight | None = None
    exhausted = current is None
    interval = renew_interval_seconds()
    try:
        while current is not None:
            pending = set(current.futures)  # the upcoming batch's may be partly done already
            next_beat = time.monotonic() + interval
            stopped: _BatchOutcome | None = None
            while True:
                if upcoming is None and not exhausted and len(pending) <= 2 * pool.limit:
                    upcoming = _batch_start(batch_ids, client=client, limiter=limiter, pool=pool)
                    exhausted = upcoming is None
                    if exhausted and leave is not None:
                        leave()  # no more batches for us: the others may take our share of the rate
                if not pending:
                    break
                timeout = max(0.0, min(next_beat - time.monotonic(), SIZING_INTERVAL_SECONDS))
                if stop_requested is not None:
                    timeout = min(timeout, STOP_POLL_SECONDS)
                done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                _take_results(current, done, on_progress)
                if stop_requested is not None and stop_requested():
                    stopped = _BatchOutcome.INTERRUPTED
                    break
                sizer.update()
                if time.monotonic() >= next_beat:
                    reason = current.heartbeat()
                    if reason is not None:
                        logger.warning("batch %s of run #%s stopped: %s", current.batch.number, current.run.pk, reason)
                        stopped = _BatchOutcome.LOST
                        break
                    if upcoming is not None and (reason := upcoming.heartbeat()) is not None:
                        logger.warning(
                            "batch %s of run #%s stopped: %s", upcoming.batch.number, upcoming.run.pk, reason
                        )
                        upcoming.abort()
                        upcoming, exhausted = None, True
                    next_beat = time.monotonic() + interval
            if stopped is None and current.heartbeat() is not None:  # the last word before writing
                stopped = _BatchOutcome.LOST
            if stopped is not None:
                current.abort()
                if upcoming is not None:
                    upcoming.abort()
                outcomes.append(stopped)
                return outcomes
            # The pool checks the upcoming batch meanwhile.
            outcomes.append(_batch_finish(current))
            if outcomes[-1] == _BatchOutcome.LOST:
                if upcoming is not None:
                    upcoming.abort()
                return outcomes
            current, upcoming = upcoming, None
            if current is None and not exhausted:
                current = _batch_start(batch_ids, client=client, limiter=limiter, pool=pool)
                exhausted = current is None
    except BaseException:
        # A time limit, a database error: the checks in flight stop asking; the claims expire
        # and the sweeper sends the batches again.
        for inflight in (current, upcoming):
            if inflight is not None:
                inflight.abort()
        raise
    finally:
        if leave is not None:
            leave()
    return outcomes


def _batch_finish(inflight: _BatchInFlight) -> _BatchOutcome:
    """Record a batch whose checks all completed, log its lines, weigh the breaker, finalize."""
    run = inflight.run
    if not _record_checks(inflight=inflight):
        logger.warning("batch %s of run #%s not recorded: the run is closed", inflight.batch.number, run.pk)
        return _BatchOutcome.LOST
    base_index = inflight.batch.number * run.batch_size
    for offset, row in enumerate(inflight.rows, start=1):
        check = inflight.checks[row.id]
        reporting.log_token_line(
            index=base_index + offset,
            planned=run.planned,
            card_name=row.card_name,
            user_name=row.user_name,
            last_used=row.last_used,
            outcome=check.result.outcome,
            message=check.result.message,
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "token %s: %s http=%s %.3fs %s",
                row.id,
                check.result.outcome,
                check.result.http_status,
                check.result.elapsed,
                check.result.message,
            )
    _evaluate_breaker(run.pk)
    token_refresh_finalize_if_complete(run_id=run.pk)
    return _BatchOutcome.RECORDED


# --- recording --------------------------------------------------------------------------------


def _record_checks(*, inflight: _BatchInFlight) -> bool:
    """Write a batch's results with a few batched UPDATEs and one history INSERT; False (nothing
    written) when the run is no longer running or the batch is no longer ours."""
    run, batch = inflight.run, inflight.batch
    now = timezone.now()
    with transaction.atomic():
        # Lock the run row first (the order every writer uses), then re-check it: a run taken
        # over, abandoned or interrupted while this batch was checked records nothing.
        live = RefreshRun.objects.select_for_update().filter(pk=run.pk, status=RunStatus.RUNNING)
        if not list(live.values_list("pk", flat=True)):
            return False
        done = RefreshBatch.objects.filter(pk=batch.pk, status=BatchStatus.CLAIMED, claimed_by=inflight.claim).update(
            status=BatchStatus.DONE, claimed_until=None
        )
        if not done:
            return False
        checks = list(inflight.checks.values())
        if not run.dry_run:
            checks = _checks_of_tokens_still_stored(inflight.rows, checks)
        _record_batch(run=run, now=now, checks=checks)
    return True


def _checks_of_tokens_still_stored(rows: list[_TokenRow], checks: list[TokenCheck]) -> list[TokenCheck]:
    """The checks whose row still holds the token that was checked, with those rows locked until
    the batch is recorded. A row whose token was replaced meanwhile (the same person scanned again)
    or that was deleted gets nothing: an answer about its old token says nothing about its new one
    — above all, an "invalid" must never flag the new, valid token for deletion."""
    checked_fingerprint = {row.id: row.fingerprint for row in rows}
    current = dict(
        BaomingToken.objects.filter(id__in=list(checked_fingerprint))
        .order_by("id")
        .select_for_update()
        .values_list("id", "fingerprint")
    )
    kept = [check for check in checks if current.get(check.token_id) == checked_fingerprint.get(check.token_id)]
    if len(kept) < len(checks):
        dropped = sorted({c.token_id for c in checks} - {c.token_id for c in kept})
        logger.warning("results of token(s) %s dropped: replaced or deleted while they were checked", dropped)
    return kept


def _record_batch(*, run: RefreshRun, now: datetime, checks: list[TokenCheck]) -> None:
    """A few batched UPDATEs (one per outcome and message), one history INSERT, the run's counts."""
    by_outcome: dict[CheckOutcome, list[int]] = defaultdict(list)
    failures_by_message: dict[tuple[str, bool], list[int]] = defaultdict(list)
    invalid_by_message: dict[str, list[int]] = defaultdict(list)
    suspect_by_message: dict[str, list[int]] = defaultdict(list)
    throttled = 0
    for check in checks:
        outcome = check.result.outcome
        throttled += check.rate_limited_answers
        if outcome == CheckOutcome.RATE_LIMITED:
            outcome = CheckOutcome.TRANSIENT  # still throttled after every retry: keep, count failed
        by_outcome[outcome].append(check.token_id)
        if outcome == CheckOutcome.TRANSIENT:
            failures_by_message[(check.result.message[:500], check.result.answered)].append(check.token_id)
        elif outcome == CheckOutcome.INVALID:
            invalid_by_message[f"invalid: {check.result.message}"[:500]].append(check.token_id)
        elif outcome == CheckOutcome.SUSPECT:
            suspect_by_message[check.result.message[:500]].append(check.token_id)
    suspect_ids = by_outcome[CheckOutcome.SUSPECT]
    if run.dry_run:
        # Nothing is written to tokens; count what this answer would have flagged.
        suspect_flagged = (
            _suspect_limit_reached(suspect_ids, now=now, unwritten_answers=1).count() if suspect_ids else 0
        )
    else:
        suspect_flagged = _write_token_results(
            run=run,
            now=now,
            valid_ids=by_outcome[CheckOutcome.VALID],
            invalid_by_message=invalid_by_message,
            suspect_by_message=suspect_by_message,
            failures_by_message=failures_by_message,
        )
        token_history_record(run=run, checked_at=now, checks=[(c.token_id, c.result) for c in checks])
    checked = sum(len(ids) for ids in by_outcome.values())
    # A suspect answer that reaches the limit counts as invalid (the token is deleted as
    # such, and the breaker weighs it so); one below the limit counts as a failure.
    RefreshRun.objects.filter(pk=run.pk).update(
        total=F("total") + checked,
        ok=F("ok") + len(by_outcome[CheckOutcome.VALID]),
        invalid=F("invalid") + len(by_outcome[CheckOutcome.INVALID]) + suspect_flagged,
        failed=F("failed") + len(by_outcome[CheckOutcome.TRANSIENT]) + len(suspect_ids) - suspect_flagged,
        rate_limited=F("rate_limited") + throttled,
        batches_done=F("batches_done") + 1,
        heartbeat_at=now,
    )


def _suspect_limit_reached(token_ids: list[int], *, now: datetime, unwritten_answers: int = 0) -> QuerySet:
    """Tokens of ``token_ids`` whose suspect streak holds BAOMING_SUSPECT_LIMIT answers spanning at
    least an hour — counting ``unwritten_answers`` more that a dry run did not write."""
    return BaomingToken.objects.filter(
        id__in=token_ids,
        suspect_count__gte=settings.BAOMING_SUSPECT_LIMIT - unwritten_answers,
        suspect_since__lte=now - SUSPECT_MIN_SPAN,
    )


def _write_token_results(
    *,
    run: RefreshRun,
    now: datetime,
    valid_ids: list[int],
    invalid_by_message: dict[str, list[int]],
    suspect_by_message: dict[str, list[int]],
    failures_by_message: dict[tuple[str, bool], list[int]],
) -> int:
    """One UPDATE per outcome and message; returns how many suspect tokens reached the limit
    (flagged for deletion at the end of the run, like invalid ones)."""
    tokens = BaomingToken.objects
    failing_since = Coalesce(F("failing_since"), Value(now))
    if valid_ids:
        # Any valid answer ends every streak.
        tokens.filter(id__in=valid_ids).update(
            last_used=now,
            last_checked_at=now,
            last_answered_at=now,
            consecutive_failures=0,
            last_error="",
            invalid_in_run=None,
            failing_since=None,
            suspect_count=0,
            suspect_since=None,
        )
    for message, ids in invalid_by_message.items():
        # An explicit "invalid" ends the suspect streak too: the token goes as invalid (or, if
        # the breaker trips, stays with that failure counted).
        tokens.filter(id__in=ids).update(
            last_checked_at=now,
            last_answered_at=now,
            last_error=message,
            invalid_in_run=run.pk,
            failing_since=failing_since,
            suspect_count=0,
            suspect_since=None,
        )
    for message, ids in suspect_by_message.items():
        tokens.filter(id__in=ids).update(
            last_checked_at=now,
            last_answered_at=now,
            consecutive_failures=F("consecutive_failures") + 1,
            last_error=message,
            invalid_in_run=None,
            failing_since=failing_since,
            suspect_count=F("suspect_count") + 1,
            suspect_since=Coalesce(F("suspect_since"), Value(now)),
        )
    for (message, answered), ids in failures_by_message.items():
        # Neither counts toward a suspect streak nor breaks it: no word about the token.
        tokens.filter(id__in=ids).update(
            last_checked_at=now,
            consecutive_failures=F("consecutive_failures") + 1,
            last_error=message,
            invalid_in_run=None,
            failing_since=failing_since,
            **({"last_answered_at": now} if answered else {}),
        )
    suspect_ids = [token_id for ids in suspect_by_message.values() for token_id in ids]
    if not suspect_ids:
        return 0
    return _suspect_limit_reached(suspect_ids, now=now).update(invalid_in_run=run.pk)


# --- circuit breaker --------------------------------------------------------------------------


def breaker_should_trip(*, ok: int, invalid: int) -> bool:
    """More than BAOMING_BREAKER_THRESHOLD of the definitive answers would delete their token
    (``invalid`` counts "invalid access_token" answers and suspect answers that reached the
    limit together), and at least BAOMING_BREAKER_MIN_INVALID do — whatever the size of the run,
    so a small deployment or the 6-hourly subset run is protected too, while one dead token of
    one (or of three) is deleted."""
    if invalid < settings.BAOMING_BREAKER_MIN_INVALID:
        return False
    return invalid / (ok + invalid) > settings.BAOMING_BREAKER_THRESHOLD


def _breaker_title() -> str:
    return _("报名工具 token refresh: circuit breaker tripped")


def _evaluate_breaker(run_id: int) -> None:
    """Trip on the answers so far (after each batch, so a run turning bad alerts early)."""
    run = RefreshRun.objects.only("ok", "invalid", "breaker_tripped", "dry_run").get(pk=run_id)
    if run.breaker_tripped or not breaker_should_trip(ok=run.ok, invalid=run.invalid):
        return
    if not RefreshRun.objects.filter(pk=run_id, breaker_tripped=False).update(breaker_tripped=True):
        return
    answers = run.ok + run.invalid
    if run.dry_run:
        logger.warning("dry run #%s: the circuit breaker would trip (%d of %d invalid)", run_id, run.invalid, answers)
        return  # a dry run reports; it never alerts
    alert_problem(
        key=BREAKER_ALERT_KEY,
        title=_breaker_title(),
        body=_(
            "Run #%(run)s: %(invalid)d of %(answers)d answers would delete their token ('invalid "
            "access_token', or the last of a token's suspect answers such as '登录已过期'): more than "
            "%(threshold)s. No token will be deleted by this run; check the upstream (and "
            "BAOMING_API_BASE) before the next run."
        )
        % {
            "run": run_id,
            "invalid": run.invalid,
            "answers": answers,
            "threshold": f"{settings.BAOMING_BREAKER_THRESHOLD:.0%}",
        },
        level="error",
    )


# --- run lifecycle ----------------------------------------------------------------------------


def token_refresh_abandon(*, run_id: int, reason: str) -> bool:
    """Close a live run that nobody works any more as ``abandoned`` (and alert). Whoever finds
    it so — the next run taking its expired lock, the sweeper, its own worker that lost the
    lock — calls this; the compare-and-swap lets exactly one of them close it."""
    return run_end_unfinished(run_id=run_id, status=RunStatus.ABANDONED, error=f"abandoned: {reason}") is not None


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

    Raises ``RefreshAlreadyRunning`` when another run holds the lock, ``InvalidRunArguments``
    (a ValueError) for a ``max_age_days`` it cannot work with. A dry run takes no lock (it
    writes nothing to tokens).
    """
    if max_age_days is not None:
        max_age_days = run_days_validate(max_age_days, name="max_age_days")
    batch_size = batch_size or settings.BAOMING_BATCH_SIZE
    owner = uuid.uuid4().hex
    if not dry_run:
        if not lock_acquire(name=REFRESH_LOCK_NAME, owner=owner, ttl_seconds=settings.BAOMING_RUN_LOCK_TTL):
            holder = lock_holder(name=REFRESH_LOCK_NAME)
            until = reporting.format_time(holder.expires_at) if holder else "?"
            raise RefreshAlreadyRunning(f"another refresh run is in progress (lock held until {until} unless renewed)")
        # We hold the lock, so any run still marked live lost its workers: close it (and alert).
        stale = RefreshRun.objects.filter(kind=RunKind.REFRESH, dry_run=False, status__in=LIVE_RUN_STATUSES)
        for stale_id in stale.values_list("pk", flat=True):
            token_refresh_abandon(run_id=stale_id, reason="its workers stopped renewing the lock")
    try:
        with transaction.atomic():
            now = timezone.now()
            run = RefreshRun.objects.create(
                kind=RunKind.REFRESH,
                trigger=trigger,
                max_age_days=max_age_days,
                dry_run=dry_run,
                lock_owner=owner,
                dispatched=dispatch is not None,
                heartbeat_at=now,
            )
            dispatched_at = now if dispatch is not None else None
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
                    pending.append(RefreshBatch(run=run, number=number, token_ids=chunk, dispatched_at=dispatched_at))
                    number, planned, chunk = number + 1, planned + len(chunk), []
                    if len(pending) >= 100:
                        RefreshBatch.objects.bulk_create(pending)
                        pending = []
            if chunk:
                pending.append(RefreshBatch(run=run, number=number, token_ids=chunk, dispatched_at=dispatched_at))
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
        token_refresh_finalize_if_complete(run_id=run.pk)
        run.refresh_from_db()
    return run


def _pending_batches(*, first: int, until: float, keep_going: Callable[[], bool] | None = None) -> Iterator[int]:
    """``first``, then its run's pending batches in order while the run is running, ``until``
    (monotonic) has not passed and ``keep_going()`` (when given) says so."""

    def more() -> bool:
        return time.monotonic() < until and (keep_going is None or keep_going())

    yield first
    if not more():
        return
    run_id = RefreshBatch.objects.filter(pk=first).values_list("run_id", flat=True).first()
    tried: set[int] = {first}
    while run_id is not None and more():
        ids = list(
            RefreshBatch.objects.filter(run_id=run_id, run__status=RunStatus.RUNNING, status=BatchStatus.PENDING)
            .exclude(id__in=tried)
            .order_by("number")
            .values_list("id", flat=True)[:4]
        )
        if not ids:
            return
        for batch_id in ids:
            if not more():
                return
            tried.add(batch_id)
            yield batch_id


def token_refresh_batch(
    *,
    batch_id: int,
    client: BaomingClient | None = None,
    limiter: RateLimiter | None = None,
    on_progress: Callable[[int], None] | None = None,
    drain_seconds: float = 0.0,
    keep_draining: Callable[[], bool] | None = None,
) -> bool:
    """Check one batch and record it; True when this call recorded it.

    Idempotent: a done batch, a batch claimed by a live worker, or a batch of a closed run is
    skipped without calling the upstream. With ``drain_seconds`` (the Celery task), once its own
    batch is claimed the call goes on with the run's further pending batches, overlapped, until
    that many seconds have passed, none is left or ``keep_draining()`` turns false (the worker is
    shutting down); their own messages then skip them.
    """
    outcomes = _batches_work(
        batch_ids=_pending_batches(first=batch_id, until=time.monotonic() + drain_seconds, keep_going=keep_draining),
        client=client,
        limiter=limiter,
        on_progress=on_progress,
        stop_requested=None,
        first_must_claim=True,
    )
    return bool(outcomes) and outcomes[0] == _BatchOutcome.RECORDED


def token_refresh_finalize_if_complete(*, run_id: int) -> None:
    """Finalize a running run whose every batch is recorded (exactly one caller wins)."""
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
        deleted = 0 if run.breaker_tripped else run.invalid  # what it would have deleted
    elif run.breaker_tripped:
        # Suspect tokens had their failure counted when recorded; an invalid answer had not.
        flagged.filter(suspect_count=0).update(
            invalid_in_run=None, consecutive_failures=F("consecutive_failures") + 1, last_error=BREAKER_KEPT_MESSAGE
        )
        flagged.filter(suspect_count__gt=0).update(invalid_in_run=None, last_error=BREAKER_KEPT_SUSPECT_MESSAGE)
    else:
        last_renewal = time.monotonic()

        def log_deleted(record) -> None:
            nonlocal last_renewal
            reporting.log_deleted_line(
                card_name=record.card_name, user_name=record.user_name, masked=record.token_masked, reason=record.detail
            )
            if time.monotonic() - last_renewal >= renew_interval_seconds():  # a long deletion keeps its lock
                lock_renew(name=REFRESH_LOCK_NAME, owner=run.lock_owner, ttl_seconds=settings.BAOMING_RUN_LOCK_TTL)
                last_renewal = time.monotonic()

        # An invalid answer resets the suspect streak, so flagged tokens with one reached its limit.
        deleted = tokens_delete(
            queryset=flagged.filter(suspect_count=0), reason=DeletionReason.INVALID, run=run, on_deleted=log_deleted
        )
        deleted += tokens_delete(
            queryset=flagged.filter(suspect_count__gt=0), reason=DeletionReason.SUSPECT, run=run, on_deleted=log_deleted
        )
    run.refresh_from_db()
    if run.breaker_tripped:
        status = RunStatus.TRIPPED
    elif run.total > 0 and run.ok == 0 and run.invalid == 0:
        status = RunStatus.FAILED  # nothing could be verified: upstream unreachable or broken
        run.error = run.error or "every check failed (upstream unreachable or answering errors)"
    else:
        status = RunStatus.SUCCEEDED
    run = run_close(run, status=status, deleted=deleted)
    if status == RunStatus.SUCCEEDED and not run.dry_run:
        alert_resolved(
            key=BREAKER_ALERT_KEY,
            title=_breaker_title(),
            body=_("Run #%(run)s completed without tripping the circuit breaker.") % {"run": run.pk},
        )
    return run


def token_refresh_abort(*, run_id: int, error: str, status: str = RunStatus.FAILED) -> RefreshRun | None:
    """End an unfinished run: ``failed`` (the in-process runner crashed) or ``interrupted``."""
    return run_end_unfinished(run_id=run_id, status=status, error=error)


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
    stop: threading.Event | None = None,
) -> RefreshRun:
    """A whole refresh run in this process (the command and the benchmark use it).

    Setting ``stop`` (the command does on SIGTERM / Ctrl-C) ends the run soon after as
    ``interrupted``: the batch in flight records nothing, the lock is released, people alerted.
    """
    run = token_refresh_start(trigger=trigger, max_age_days=max_age_days, token_ids=token_ids, dry_run=dry_run)
    if on_start is not None:
        on_start(run)
    stop_requested = stop.is_set if stop is not None else None
    try:
        listed = list(run.batches.filter(status=BatchStatus.PENDING).order_by("number").values_list("id", flat=True))

        def batch_ids() -> Iterator[int]:
            for batch_id in listed:
                if stop is not None and stop.is_set():
                    return
                yield batch_id

        outcomes = _batches_work(
            batch_ids=batch_ids(),
            client=client,
            limiter=limiter,
            on_progress=on_progress,
            stop_requested=stop_requested,
        )
        interrupted = (outcomes and outcomes[-1] == _BatchOutcome.INTERRUPTED) or (
            stop is not None and stop.is_set() and (not outcomes or outcomes[-1] != _BatchOutcome.LOST)
        )
        if interrupted and run.batches.exclude(status=BatchStatus.DONE).exists():
            token_refresh_abort(
                run_id=run.pk, status=RunStatus.INTERRUPTED, error="interrupted: stop requested (signal)"
            )
    except BaseException as exc:
        status = RunStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt | SystemExit) else RunStatus.FAILED
        token_refresh_abort(
            run_id=run.pk, status=status, error=scrub_secrets(f"interrupted: {type(exc).__name__}: {exc}")
        )
        raise
    run.refresh_from_db()
    return run
