"""The transfer executor: move leases whose term is over to the next team, or end them.

Claim → call → record, never a row lock across an HTTP call:

1. **Claim** due leases (``select_for_update(skip_locked=True)`` on PostgreSQL, a conditional
   UPDATE per lease on SQLite) by writing ``claimed_until``/``claimed_by``: two workers never take
   the same lease, and a crashed worker's claim lapses after ``LEASE_CLAIM_TTL``.
2. **Start**: ``active → transferring`` with the target team chosen under the team locks (event
   ``transfer_started``). If the entitlement is over (``ends_at`` passed) there is no target.
3. **Invite** into the target team, then record ``transfer_step = invited`` (event ``invited``).
   A resumed transfer with that step never invites again.
4. **Remove** from the old team (404 is done), then in one transaction the ``left_old_team`` event
   and ``transferring → pending`` on the new team (event ``transferred``) — or ``→ expired``.

Transient failures (provider 429/5xx/timeouts, no free seat) schedule a retry with exponential
backoff and jitter in ``next_attempt_at``; after ``LEASE_TRANSFER_MAX_ATTEMPTS`` failed attempts,
or on a permanent provider error, the lease goes ``failed`` and people are alerted.
"""

from __future__ import annotations

import logging
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from queue import Empty, SimpleQueue

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from leases.models import LeaseAction, LeaseStatus, MemberLease, Team, TransferStep
from leases.providers import ProviderError, provider_for
from leases.selectors import leases_due_for_transfer, team_choices
from leases.services.invites import seat_free
from leases.services.transitions import IllegalTransitionError, lease_event_record, lease_transition
from leasesite.notify import alert_send

logger = logging.getLogger(__name__)


# Written when a lease's step is recorded: the worker's claim on it ends with the step.
UNCLAIMED = {"claimed_until": None, "claimed_by": ""}


class NoTargetTeamError(Exception):
    """No team has a free seat for this lease right now (transient: seats free up)."""


@dataclass
class TransferOutcome:
    lease_id: int
    email: str
    outcome: str  # transferred | expired | retry | failed | skipped | would_transfer | would_expire
    detail: str = ""


@dataclass
class TransferRunResult:
    claimed: int = 0
    outcomes: list[TransferOutcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    def summary(self) -> dict[str, int]:
        keys = ("transferred", "expired", "retry", "failed", "skipped", "would_transfer", "would_expire")
        return {"claimed": self.claimed, **{k: self.count(k) for k in keys if self.count(k)}}


def transfer_backoff_seconds(attempts: int) -> float:
    """Exponential backoff with jitter: base × 2^(attempts-1), capped, then scaled by 0.5–1.0."""
    base = settings.LEASE_TRANSFER_BACKOFF_SECONDS
    ceiling = settings.LEASE_TRANSFER_BACKOFF_MAX_SECONDS
    delay = min(ceiling, base * (2 ** max(0, attempts - 1)))
    return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not cryptography


# -- claiming ----------------------------------------------------------------------------------------
def leases_claim_due(
    *, owner: str, batch_size: int, email: str | None = None, now: datetime | None = None
) -> list[int]:
    now = now or timezone.now()
    until = now + timedelta(seconds=settings.LEASE_CLAIM_TTL)
    due = leases_due_for_transfer(now=now)
    if email:
        due = due.filter(email__iexact=email)
    due = due.order_by("expires_at", "pk")
    if connection.features.has_select_for_update_skip_locked:
        with transaction.atomic():
            ids = list(due.select_for_update(skip_locked=True).values_list("pk", flat=True)[:batch_size])
            if ids:
                MemberLease.objects.filter(pk__in=ids).update(claimed_until=until, claimed_by=owner)
        return ids
    claimed = []
    for lease_id in due.values_list("pk", flat=True)[:batch_size]:
        # The count says who won: the UPDATE re-checks "due and unclaimed" atomically.
        if leases_due_for_transfer(now=now).filter(pk=lease_id).update(claimed_until=until, claimed_by=owner) == 1:
            claimed.append(lease_id)
    return claimed


def leases_release(*, lease_ids: list[int], owner: str) -> None:
    MemberLease.objects.filter(pk__in=lease_ids, claimed_by=owner).update(**UNCLAIMED)


# -- choosing the next team ---------------------------------------------------------------------------
def _lock_teams() -> None:
    """Lock every active team row, always in primary-key order (no deadlocks)."""
    list(Team.objects.filter(is_active=True).order_by("pk").select_for_update().values_list("pk", flat=True))


def _choose_target(lease: MemberLease, now: datetime) -> Team:
    choices = team_choices(term_months=lease.term_months, email=lease.email, exclude_team_ids=(lease.team_id,), now=now)
    if not choices:
        raise NoTargetTeamError("no other active team has a free seat")
    return choices[0].team


def _entitlement_over(lease: MemberLease, now: datetime) -> bool:
    return lease.ends_at is not None and lease.ends_at <= now


# -- one lease ------------------------------------------------------------------------------------------
def lease_transfer(*, lease_id: int, now: datetime | None = None, actor_id: int | None = None) -> TransferOutcome:
    """Advance one (claimed) lease as far as it goes; see the module docstring."""
    now = now or timezone.now()
    lease = MemberLease.objects.select_related("team", "transfer_team").get(pk=lease_id)
    try:
        if lease.status == LeaseStatus.ACTIVE:
            lease = lease_transfer_start(lease=lease, now=now, actor_id=actor_id)
        if lease.status != LeaseStatus.TRANSFERRING:
            return TransferOutcome(lease.pk, lease.email, "skipped", f"lease is {lease.status}")
        return _advance(lease, now)
    except IllegalTransitionError as exc:
        return TransferOutcome(lease.pk, lease.email, "skipped", str(exc))
    except (ProviderError, NoTargetTeamError) as exc:
        return _record_failure(lease_id, exc, now)


def lease_transfer_start(
    *, lease: MemberLease, now: datetime, actor_id: int | None = None, forced: bool = False
) -> MemberLease:
    """active → transferring, with the target team chosen under the team locks."""
    ending = _entitlement_over(lease, now)
    with transaction.atomic():
        target = None
        if not ending:
            _lock_teams()
            try:
                target = _choose_target(lease, now)
            except NoTargetTeamError:
                target = None  # still start: the retry will look again
        lease, _changed = lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.TRANSFERRING,
            action=LeaseAction.TRANSFER_STARTED,
            actor_id=actor_id,
            changes={
                "transfer_team": target,
                "transfer_step": TransferStep.NONE,
                "next_attempt_at": None,
                "attempts": 0,
            },
            detail={
                "from_team": lease.team.name,
                "to_team": target.name if target else None,
                "term_expired_at": lease.expires_at.isoformat() if lease.expires_at else None,
                "entitlement_over": ending,
                **({"forced": True} if forced else {}),
            },
        )
    return MemberLease.objects.select_related("team", "transfer_team").get(pk=lease.pk)


def _advance(lease: MemberLease, now: datetime) -> TransferOutcome:
    ending = _entitlement_over(lease, now)
    if not ending and lease.transfer_team_id is None:
        with transaction.atomic():
            _lock_teams()
            target = _choose_target(lease, now)
            lease_event_record(
                lease_id=lease.pk,
                action=LeaseAction.NOTE,
                detail={"to_team": target.name, "note": "target team chosen"},
                transfer_team=target,
            )
        lease = MemberLease.objects.select_related("team", "transfer_team").get(pk=lease.pk)

    if not ending and lease.transfer_step == TransferStep.NONE:
        provider_for(lease.transfer_team).invite(lease.email)
        lease_event_record(
            lease_id=lease.pk,
            action=LeaseAction.INVITED,
            detail={"team": lease.transfer_team.name, "transfer": True},
            transfer_step=TransferStep.INVITED,
        )

    removed = seat_free(team=lease.team, email=lease.email, member_id=lease.provider_member_id)
    left_detail = {"team": lease.team.name, **removed}
    with transaction.atomic():
        lease_event_record(lease_id=lease.pk, action=LeaseAction.LEFT_OLD_TEAM, detail=left_detail)
        if ending:
            lease_transition(
                lease_id=lease.pk,
                to_status=LeaseStatus.EXPIRED,
                action=LeaseAction.EXPIRED,
                expect_from=[LeaseStatus.TRANSFERRING],
                changes={**UNCLAIMED, "next_attempt_at": None, "last_error": ""},
                detail={"ends_at": lease.ends_at.isoformat(), "team": lease.team.name},
            )
            return TransferOutcome(lease.pk, lease.email, "expired", lease.team.name)
        new_team = lease.transfer_team
        lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.PENDING,
            action=LeaseAction.TRANSFERRED,
            expect_from=[LeaseStatus.TRANSFERRING],
            changes={
                "team": new_team,
                "invited_at": timezone.now(),
                "joined_at": None,
                "expires_at": None,
                "provider_member_id": "",
                "missed_syncs": 0,
                "attempts": 0,
                "next_attempt_at": None,
                "last_error": "",
                **UNCLAIMED,
            },
            detail={"from_team": lease.team.name, "to_team": new_team.name},
        )
    return TransferOutcome(lease.pk, lease.email, "transferred", f"{lease.team.name} -> {new_team.name}")


def _record_failure(lease_id: int, exc: Exception, now: datetime) -> TransferOutcome:
    lease = MemberLease.objects.select_related("team", "transfer_team").get(pk=lease_id)
    message = str(exc)[:500] or type(exc).__name__
    attempts = lease.attempts + 1
    permanent = isinstance(exc, ProviderError) and not exc.transient
    if lease.status != LeaseStatus.TRANSFERRING:
        return TransferOutcome(lease.pk, lease.email, "skipped", message)
    if permanent or attempts >= settings.LEASE_TRANSFER_MAX_ATTEMPTS:
        dangling = _cancel_dangling_invite(lease)
        lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.FAILED,
            action=LeaseAction.TRANSFER_FAILED,
            expect_from=[LeaseStatus.TRANSFERRING],
            changes={
                "attempts": attempts,
                "last_error": message,
                "next_attempt_at": None,
                **UNCLAIMED,
            },
            detail={"error": message, "attempts": attempts, "permanent": permanent, **dangling},
        )
        alert_send(
            title=f"lease transfer failed: {lease.email}",
            body=(
                f"Lease {lease.pk} ({lease.email}, team {lease.team.name}) failed after {attempts} attempt(s): "
                f"{message}. It needs an operator (admin: retry, reset or cancel)."
            ),
            level="error",
        )
        return TransferOutcome(lease.pk, lease.email, "failed", message)
    next_attempt_at = now + timedelta(seconds=transfer_backoff_seconds(attempts))
    lease_event_record(
        lease_id=lease.pk,
        action=LeaseAction.TRANSFER_RETRY,
        detail={"error": message, "attempt": attempts, "next_attempt_at": next_attempt_at.isoformat()},
        attempts=attempts,
        last_error=message,
        next_attempt_at=next_attempt_at,
        **UNCLAIMED,
    )
    return TransferOutcome(lease.pk, lease.email, "retry", message)


def _cancel_dangling_invite(lease: MemberLease) -> dict:
    """A transfer that gives up after inviting to the next team withdraws that invite."""
    if lease.transfer_step != TransferStep.INVITED or lease.transfer_team is None:
        return {}
    try:
        provider_for(lease.transfer_team).cancel_invite(lease.email)
    except ProviderError as exc:
        return {"invited_to": lease.transfer_team.name, "invite_cancelled": False, "cancel_error": str(exc)[:200]}
    return {"invited_to": lease.transfer_team.name, "invite_cancelled": True}


# -- runs ---------------------------------------------------------------------------------------------
def _transfer_in_thread(pending: SimpleQueue[int], now: datetime) -> list[TransferOutcome]:
    """One pool thread: move leases from ``pending`` until none is left, on one database
    connection closed at the end (a new connection per lease costs PostgreSQL a fresh backend
    each time, which doubled its CPU per transfer)."""
    outcomes = []
    try:
        while True:
            try:
                lease_id = pending.get_nowait()
            except Empty:
                return outcomes
            outcomes.append(lease_transfer(lease_id=lease_id, now=now))
            close_old_connections()  # a broken connection is not reused for the next lease
    finally:
        connection.close()


def transfers_run(
    *, email: str | None = None, limit: int | None = None, now: datetime | None = None, owner: str | None = None
) -> TransferRunResult:
    """Claim and move due leases in batches until none is left (or ``limit`` were claimed)."""
    owner = owner or f"transfer-{uuid.uuid4().hex[:12]}"
    result = TransferRunResult()
    batch_size = settings.LEASE_TRANSFER_BATCH_SIZE
    concurrency = settings.LEASE_TRANSFER_CONCURRENCY
    while limit is None or result.claimed < limit:
        moment = now or timezone.now()
        size = batch_size if limit is None else min(batch_size, limit - result.claimed)
        ids = leases_claim_due(owner=owner, batch_size=size, email=email, now=moment)
        if not ids:
            break
        result.claimed += len(ids)
        try:
            if concurrency > 1 and len(ids) > 1 and not connection.in_atomic_block:
                pending: SimpleQueue[int] = SimpleQueue()
                for pk in ids:
                    pending.put(pk)
                threads = min(concurrency, len(ids))
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    done = pool.map(_transfer_in_thread, [pending] * threads, [moment] * threads)
                    position = {pk: index for index, pk in enumerate(ids)}
                    outcomes = sorted((o for chunk in done for o in chunk), key=lambda o: position[o.lease_id])
            else:
                outcomes = [lease_transfer(lease_id=pk, now=moment) for pk in ids]
        finally:
            leases_release(lease_ids=ids, owner=owner)
        result.outcomes.extend(outcomes)
        for outcome in outcomes:
            logger.info("transfer lease=%s %s %s", outcome.lease_id, outcome.outcome, outcome.detail)
    return result


def transfers_preview(*, email: str | None = None, now: datetime | None = None) -> TransferRunResult:
    """What a run would do now (``--dry-run``): no claims, no provider calls, no writes."""
    now = now or timezone.now()
    result = TransferRunResult()
    due = leases_due_for_transfer(now=now).select_related("team", "transfer_team").order_by("expires_at", "pk")
    if email:
        due = due.filter(email__iexact=email)
    for lease in due.iterator(chunk_size=500):
        result.claimed += 1
        if _entitlement_over(lease, now):
            result.outcomes.append(TransferOutcome(lease.pk, lease.email, "would_expire", lease.team.name))
            continue
        target = lease.transfer_team
        if target is None:
            choices = team_choices(
                term_months=lease.term_months, email=lease.email, exclude_team_ids=(lease.team_id,), now=now
            )
            target = choices[0].team if choices else None
        detail = f"{lease.team.name} -> {target.name if target else '(no free seat)'}"
        result.outcomes.append(TransferOutcome(lease.pk, lease.email, "would_transfer", detail))
    return result
