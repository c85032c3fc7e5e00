"""A transfer run: many leases in flight, their provider calls on a few threads, their records
written together.

``transfers_run`` (``leases.services.transfers``) hands the run to ``TransferRun``. One thread —
the caller's, the *coordinator* — does every database write of the common case, in batches; at
most ``LEASE_TRANSFER_CONCURRENCY`` *call threads* make the provider calls. Each lease still walks
its own steps in order (claim → start → invite → record → remove → record: DESIGN's "claim → call
→ record", never a row lock across an HTTP call), but no lease waits for another's call: while
one is inside a slow invite, the others are removed and recorded.

1. **Claim** due leases until ``LEASE_TRANSFER_BATCH_SIZE`` are in flight, topping up whenever
   half of them is done: the call threads never run dry, and the more answers arrive together
   the fewer records they cost. A heartbeat thread renews the claims of every lease in flight.
2. **Start** the batch's active leases in one transition (``active → transferring``): targets are
   chosen for the whole batch from one read of the pool's teams and one of the emails' seats (the
   same order as ``team_choices``, seats promised within the batch counted as used), and the seats
   taken one conditional UPDATE per team.
3. **Invite** on a call thread; the coordinator records every invite answered since its last
   look as one transition (``transfer_step = invited``), then sends each lease's removal.
4. **Remove** on a call thread; the coordinator records the answered removals in one transaction
   (``left_old_team`` and ``transferring → pending`` in the new team, or ``→ expired``).

Everything else — a lease already transferring (a retry, a crash's leftover), an evacuation, an
operator's cancel request, a failed provider call, a seat gone meanwhile, no free seat anywhere —
goes to the one-lease path ``lease_transfer`` (or ``_record_failure`` after a failed call) on a
call thread: the rare cases keep the code that was always there, the common case is cheap. Each
record re-checks the claim under the row lock, and the locked row it returns is the fresh read a
provider call needs (claim still held, no cancel request).

Inside a caller's transaction (tests) or with a concurrency of 1 the calls run on the
coordinator itself, in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from queue import Empty, SimpleQueue
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone

from leases import events
from leases.models import LeaseAction, LeaseStatus, MemberLease, Team, TransferStep
from leases.providers import ProviderError, provider_for
from leases.selectors import emails_seated_team_ids, rank_team_choices, teams_open_by_pool
from leases.services.transfers import (
    TransferOutcome,
    TransferRunResult,
    _call,
    _entitlement_over,
    _record_failure,
    arrival_changes,
    guarded,
    lease_transfer,
    leases_claim_due,
    leave_old_team,
)
from leases.services.transitions import (
    UNCLAIMED,
    leases_claim_renew,
    leases_release,
    leases_transition,
    teams_lock,
)
from leases.timeutils import add_months

logger = logging.getLogger(__name__)

# How long the coordinator lets answers gather after the first one before it records them: the
# calls of one batch answer within a few milliseconds of each other, and one transition for all of
# them costs what one costs for a single lease.
GATHER_SECONDS = 0.003


class ClaimKeeper:
    """Renews ``owner``'s claims on the leases in flight every third of ``LEASE_CLAIM_TTL``, so a
    slow run is never taken over by a second worker."""

    def __init__(self, *, owner: str, lease_ids: Callable[[], list[int]]) -> None:
        self.owner = owner
        self.lease_ids = lease_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"claims-{owner}", daemon=True)

    def __enter__(self) -> ClaimKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = max(1.0, settings.LEASE_CLAIM_TTL / 3)
        try:
            while not self._stop.wait(interval):
                try:
                    ids = self.lease_ids()
                    if ids:
                        leases_claim_renew(lease_ids=ids, owner=self.owner)
                except DatabaseError:
                    logger.warning("could not renew transfer claims of %s", self.owner)
                    close_old_connections()
        finally:
            connection.close()


@dataclass
class Move:
    """One lease on the common path: the row as last recorded, and the teams it moves between."""

    lease: MemberLease
    old_team: Team
    target: Team | None  # None: the entitlement is over, the lease ends instead
    left: dict[str, Any] | None = None  # the left_old_team event, once the removal answered

    @property
    def ending(self) -> bool:
        return self.target is None


@dataclass
class Answer:
    kind: str  # invite | removal | lease (a one-lease job: value is its TransferOutcome)
    lease_id: int
    move: Move | None
    value: Any = None
    error: BaseException | None = None


class CallThreads:
    """``size`` threads running the run's jobs in order of submission; each keeps one database
    connection for the run (a one-lease job writes; a fresh connection per lease doubled
    PostgreSQL's CPU per transfer) and closes it at the end, or after a database error."""

    def __init__(self, size: int, answers: SimpleQueue[Answer]) -> None:
        self._jobs: SimpleQueue[tuple[Answer, Callable[[], Any]] | None] = SimpleQueue()
        self._answers = answers
        self._threads = [
            threading.Thread(target=self._work, name=f"transfer-calls-{n}", daemon=True) for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, answer: Answer, job: Callable[[], Any]) -> None:
        self._jobs.put((answer, job))

    def close(self, *, cancel: bool = False) -> None:
        """Let the threads finish and end; ``cancel`` drops the jobs not started yet (a run that
        failed makes no more provider calls whose answers nobody would record)."""
        if cancel:
            with contextlib.suppress(Empty):
                while True:
                    self._jobs.get_nowait()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        try:
            while (item := self._jobs.get()) is not None:
                run_job(*item, self._answers)
        finally:
            connection.close()


class InlineCalls:
    """The same interface, each job run at once on the caller's thread (and its transaction)."""

    def __init__(self, answers: SimpleQueue[Answer]) -> None:
        self._answers = answers

    def submit(self, answer: Answer, job: Callable[[], Any]) -> None:
        run_job(answer, job, self._answers)

    def close(self, *, cancel: bool = False) -> None:
        pass


def run_job(answer: Answer, job: Callable[[], Any], answers: SimpleQueue[Answer]) -> None:
    try:
        answer.value = job()
    except BaseException as exc:  # noqa: BLE001 - handed to the coordinator, which decides
        answer.error = exc
        if isinstance(exc, DatabaseError):
            close_old_connections()
    answers.put(answer)


class TransferRun:
    def __init__(self, *, owner: str, now: datetime | None, email: str | None, limit: int | None) -> None:
        self.owner = owner
        self.fixed_now = now
        self.email = email
        self.limit = limit
        self.batch_size = settings.LEASE_TRANSFER_BATCH_SIZE
        self.concurrency = settings.LEASE_TRANSFER_CONCURRENCY
        self.result = TransferRunResult()
        self.answers: SimpleQueue[Answer] = SimpleQueue()
        self.in_flight: dict[int, datetime] = {}  # lease id -> the moment its batch was claimed
        self._in_flight_lock = threading.Lock()
        self.order: dict[int, int] = {}
        self.emails: dict[int, str] = {}
        # Leases a database error interrupted: this run does not claim them again (the error may
        # be theirs, and would come back forever); the next run does.
        self.not_again: set[int] = set()
        self.nothing_due = False
        self.unanswered = 0  # jobs sent whose answer this thread has not read yet

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TransferRunResult:
        # Threads have their own connections: they cannot see rows of a caller's open transaction,
        # so inside one everything runs in line.
        own_transaction = not connection.in_atomic_block
        threaded = own_transaction and self.concurrency > 1
        self.calls = CallThreads(self.concurrency, self.answers) if threaded else InlineCalls(self.answers)
        keeper = ClaimKeeper(owner=self.owner, lease_ids=self._held) if own_transaction else contextlib.nullcontext()
        finished = False
        try:
            with keeper:
                while True:
                    if self._may_claim():
                        self._claim()
                    if not self.in_flight and not self.unanswered:
                        break
                    self._gather()
            finished = True
        finally:
            self.calls.close(cancel=not finished)
            left = self._held()
            if left:  # a run ended by an exception: what it holds is free for the next run at once
                leases_release(lease_ids=left, owner=self.owner)
        self.result.outcomes.sort(key=lambda outcome: self.order.get(outcome.lease_id, 0))
        return self.result

    def _held(self) -> list[int]:
        with self._in_flight_lock:
            return list(self.in_flight)

    def _may_claim(self) -> bool:
        """Up to ``LEASE_TRANSFER_BATCH_SIZE`` leases are in flight: the more answers arrive
        together, the fewer records they cost. The run tops up once half of them is done (a
        claim and a start for many leases, not a few)."""
        if self.nothing_due or len(self.in_flight) > self.batch_size - max(1, self.batch_size // 2):
            return False
        return self.limit is None or self.result.claimed < self.limit

    def _claim(self) -> None:
        moment = self.fixed_now or timezone.now()
        size = self.batch_size - len(self.in_flight)
        if self.limit is not None:
            size = min(size, self.limit - self.result.claimed)
        # Not a lease still in flight here: its one-lease job may have let it go (a retry at once)
        # before its answer reached this thread; it is claimed again once that answer is in.
        ids = leases_claim_due(
            owner=self.owner,
            batch_size=size,
            email=self.email,
            now=moment,
            exclude_ids=[*self.not_again, *self.in_flight],
        )
        if not ids:
            self.nothing_due = True
            return
        with self._in_flight_lock:
            for lease_id in ids:
                self.in_flight[lease_id] = moment
                self.order.setdefault(lease_id, len(self.order))
        self.result.claimed += len(ids)
        try:
            self._start(ids, moment)
        except DatabaseError:
            self._database_error(ids)

    def _gather(self) -> None:
        """Wait for an answer, give the others of its wave a moment, then record them together."""
        answers = [self.answers.get()]
        deadline = time.monotonic() + GATHER_SECONDS
        while True:
            try:
                answers.append(self.answers.get(timeout=max(0.0, deadline - time.monotonic())))
            except Empty:
                break
        self.unanswered -= len(answers)
        invited: list[Move] = []
        removed: list[Move] = []
        for answer in answers:
            if answer.kind == "lease":
                if answer.error is not None:
                    self._unexpected(answer.lease_id, answer.error)
                else:
                    self._finish(answer.value)
            elif answer.error is not None:
                if isinstance(answer.error, ProviderError):
                    self._one_lease(answer.lease_id, _record_failure, answer.error)
                else:
                    self._unexpected(answer.lease_id, answer.error)
            elif answer.kind == "invite":
                invited.append(answer.move)
            else:
                answer.move.left = answer.value
                removed.append(answer.move)
        if invited:
            try:
                self._record_invites(invited)
            except DatabaseError:
                self._database_error([move.lease.pk for move in invited])
        if removed:
            try:
                self._record_removals(removed)
            except DatabaseError:
                self._database_error([move.lease.pk for move in removed])

    # -- the steps --------------------------------------------------------------------------------
    def _start(self, ids: list[int], moment: datetime) -> None:
        """Start the batch's common leases in one transition, then send their first calls. Nothing
        is sent before the database work is done: a database error leaves the whole batch as it was."""
        loaded = MemberLease.objects.select_related("team", "transfer_team").in_bulk(ids)
        self.emails.update((lease.pk, lease.email) for lease in loaded.values())
        one_lease = [lease_id for lease_id in ids if not self._common_start(loaded.get(lease_id), moment)]
        common = [loaded[lease_id] for lease_id in ids if lease_id not in one_lease]
        targets = choose_targets([lease for lease in common if not _entitlement_over(lease, moment)], moment)
        starting: dict[int, Move] = {}
        for lease in common:
            if _entitlement_over(lease, moment):
                starting[lease.pk] = Move(lease=lease, old_team=lease.team, target=None)
            elif lease.pk in targets:
                starting[lease.pk] = Move(lease=lease, old_team=lease.team, target=targets[lease.pk])
            else:  # no free seat anywhere: the one-lease path starts it and schedules the retry
                one_lease.append(lease.pk)

        def detail(lease: MemberLease) -> dict[str, Any]:
            move = starting[lease.pk]
            return events.transfer_started(
                from_team=move.old_team,
                to_team=move.target,
                term_expired_at=move.lease.expires_at,
                entitlement_over=move.ending,
            )["detail"]

        result = leases_transition(
            lease_ids=list(starting),
            to_status=LeaseStatus.TRANSFERRING,
            action=LeaseAction.TRANSFER_STARTED,
            claim=self.owner,
            expect_from=[LeaseStatus.ACTIVE],
            changes=lambda lease: {
                "transfer_team": starting[lease.pk].target,
                "transfer_step": TransferStep.NONE,
                "next_attempt_at": None,
                "attempts": 0,
            },
            detail=detail,
        )
        # The seat went meanwhile, or the lease was already on its way: the one-lease path.
        one_lease += [error.lease_id for error in result.full] + [lease.pk for lease in result.unchanged]
        for lease_id in one_lease:
            self._one_lease(lease_id, lease_transfer)
        for lease in result.changed:
            move = starting[lease.pk]
            move.lease = lease
            if move.ending:
                self._send("removal", move, self._removal_job(move))
            else:
                self._send("invite", move, self._invite_job(move))
        self._settle_refusals(result)

    def _record_invites(self, moves: list[Move]) -> None:
        by_id = {move.lease.pk: move for move in moves}
        result = leases_transition(
            lease_ids=list(by_id),
            action=LeaseAction.INVITED,
            claim=self.owner,
            changes={"transfer_step": TransferStep.INVITED},
            detail=lambda lease: events.invited(team=by_id[lease.pk].target, transfer=True)["detail"],
        )
        self._settle_refusals(result)
        for lease in result.changed:
            move = by_id[lease.pk]
            move.lease = lease  # read under its lock just now: the claim is ours
            if lease.cancel_requested_at is not None:
                self._one_lease(lease.pk, lease_transfer)  # honours the operator's request
            else:
                self._send("removal", move, self._removal_job(move))

    def _record_removals(self, moves: list[Move]) -> None:
        by_id = {move.lease.pk: move for move in moves}
        with transaction.atomic():
            # Two transitions below move counters (the transferred, the ended): their teams are
            # locked at once, in order, so no other transaction can wait on us the other way round.
            teams_lock(move.old_team.pk for move in moves)
            left = leases_transition(
                lease_ids=list(by_id),
                action=LeaseAction.LEFT_OLD_TEAM,
                claim=self.owner,
                detail=lambda lease: by_id[lease.pk].left["detail"],
            )
            moved = leases_transition(
                lease_ids=[lease.pk for lease in left.changed if not by_id[lease.pk].ending],
                to_status=LeaseStatus.PENDING,
                action=LeaseAction.TRANSFERRED,
                claim=self.owner,
                expect_from=[LeaseStatus.TRANSFERRING],
                changes=lambda lease: arrival_changes(by_id[lease.pk].target),
                detail=lambda lease: events.transferred(
                    from_team=by_id[lease.pk].old_team, to_team=by_id[lease.pk].target
                )["detail"],
            )
            ended = leases_transition(
                lease_ids=[lease.pk for lease in left.changed if by_id[lease.pk].ending],
                to_status=LeaseStatus.EXPIRED,
                action=LeaseAction.EXPIRED,
                claim=self.owner,
                expect_from=[LeaseStatus.TRANSFERRING],
                changes={**UNCLAIMED, "next_attempt_at": None, "last_error": ""},
                detail=lambda lease: events.expired(ends_at=lease.ends_at, team=by_id[lease.pk].old_team)["detail"],
            )
        for result in (left, moved, ended):
            self._settle_refusals(result)
        for lease in moved.changed:
            move = by_id[lease.pk]
            self._finish(
                TransferOutcome(lease.pk, lease.email, "transferred", f"{move.old_team.name} -> {move.target.name}")
            )
        for lease in ended.changed:
            self._finish(TransferOutcome(lease.pk, lease.email, "expired", by_id[lease.pk].old_team.name))
        for lease in [*moved.unchanged, *ended.unchanged]:  # not transferring any more: not ours to move
            self._finish(TransferOutcome(lease.pk, lease.email, "skipped", f"lease is {lease.status}"))

    # -- plumbing ---------------------------------------------------------------------------------
    def _common_start(self, lease: MemberLease | None, moment: datetime) -> bool:
        """An active lease of a live team, ours, with no cancel request: the common case."""
        return (
            lease is not None
            and lease.status == LeaseStatus.ACTIVE
            and not lease.team.is_dead
            and lease.cancel_requested_at is None
            and lease.claimed_by == self.owner
            and lease.claimed_until is not None
            and lease.claimed_until >= moment
        )

    @staticmethod
    def _invite_job(move: Move) -> Callable[[], None]:
        target, email = move.target, move.lease.email
        return lambda: _call(target, "invite", lambda: provider_for(target).invite(email))

    @staticmethod
    def _removal_job(move: Move) -> Callable[[], dict[str, Any]]:
        team, email, member_id = move.old_team, move.lease.email, move.lease.provider_member_id
        return lambda: leave_old_team(team=team, email=email, member_id=member_id)

    def _send(self, kind: str, move: Move, job: Callable[[], Any]) -> None:
        self.unanswered += 1
        self.calls.submit(Answer(kind=kind, lease_id=move.lease.pk, move=move), job)

    def _one_lease(self, lease_id: int, step: Callable[..., TransferOutcome], *args: Any) -> None:
        """Hand the lease to the one-lease code, on a call thread: ``lease_transfer`` carries it
        as far as it goes from wherever it is; ``_record_failure`` records a failed call."""
        moment = self.in_flight.get(lease_id) or self.fixed_now or timezone.now()
        owner = self.owner
        if step is lease_transfer:
            job = lambda: guarded(lease_id, lambda: lease_transfer(lease_id=lease_id, owner=owner, now=moment))  # noqa: E731
        else:
            job = lambda: guarded(lease_id, lambda: step(lease_id, *args, moment, owner))  # noqa: E731
        self.unanswered += 1
        self.calls.submit(Answer(kind="lease", lease_id=lease_id, move=None), job)

    def _settle_refusals(self, result: Any) -> None:
        """Outcomes for the leases a record did not change (its claim lost, the table refused):
        the caller has dispatched or finished the changed ones."""
        for stale in result.stale:
            self._finish(TransferOutcome(stale.lease_id, self._email(stale.lease_id), "stale", stale.reason))
        for refused in result.refused:
            self._finish(TransferOutcome(refused.lease_id, self._email(refused.lease_id), "skipped", str(refused)))
        for lease_id in result.missing:
            self._finish(TransferOutcome(lease_id, "", "skipped", "the lease no longer exists"))

    def _email(self, lease_id: int) -> str:
        return self.emails.get(lease_id, "")

    def _database_error(self, lease_ids: Iterable[int]) -> None:
        """A record that hit a database error (a killed connection, a failover): nothing of it was
        written, those leases stay where they were, and the next run resumes them (a call already
        answered is made again: a second invite is answered "already invited", a second removal
        "not a member", both done)."""
        logger.exception("transfer run %s: a database error while recording leases %s", self.owner, list(lease_ids))
        close_old_connections()
        for lease_id in lease_ids:
            self._finish(TransferOutcome(lease_id, "", "skipped", "database error"))

    def _unexpected(self, lease_id: int, error: BaseException) -> None:
        logger.error("transfer of lease %s failed unexpectedly", lease_id, exc_info=error)
        self._finish(TransferOutcome(lease_id, "", "skipped", f"unexpected error: {type(error).__name__}"))

    def _finish(self, outcome: TransferOutcome) -> None:
        """The run is done with this lease. Every path but a skip wrote the claim off with its
        last record; a skipped lease is let go here (a stale one is someone else's)."""
        logger.info("transfer lease=%s %s %s", outcome.lease_id, outcome.outcome, outcome.detail)
        if not outcome.email:
            outcome.email = self._email(outcome.lease_id)
        self.result.outcomes.append(outcome)
        with self._in_flight_lock:
            self.in_flight.pop(outcome.lease_id, None)
        self.nothing_due = False  # a lease let go may be due again (a retry at once)
        if outcome.outcome == "skipped":
            if outcome.detail.startswith("database error"):
                self.not_again.add(outcome.lease_id)
            with contextlib.suppress(DatabaseError):
                leases_release(lease_ids=[outcome.lease_id], owner=self.owner)


def choose_targets(leases: list[MemberLease], now: datetime) -> dict[int, Team]:
    """The next team of each lease, for a whole batch from two queries: the best other team of its
    pool with a free seat where its email does not sit yet (``team_choices``' order), counting the
    seats already promised to the batch's earlier leases. Leases with no free seat anywhere are
    left out. The seats are taken by the transition, which re-checks them on the locked rows."""
    if not leases:
        return {}
    teams_by_pool = teams_open_by_pool(pools={lease.team.pool for lease in leases}, now=now)
    seated = emails_seated_team_ids(lease.email for lease in leases)
    promised: Counter[int] = Counter()
    targets: dict[int, Team] = {}
    for lease in leases:
        email = lease.email.strip().lower()
        busy = seated.setdefault(email, set())
        pool = teams_by_pool.get(lease.team.pool, [])
        teams = [team for team in pool if team.pk != lease.team_id and team.pk not in busy]
        choices = rank_team_choices(teams, term_end=add_months(now, lease.term_months), taken_meanwhile=promised)
        if choices:
            target = choices[0].team
            targets[lease.pk] = target
            promised[target.pk] += 1
            busy.add(target.pk)
    return targets
