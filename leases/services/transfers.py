"""The transfer executor: move leases whose term is over to the next team, or end them.

This module is one lease's path (``lease_transfer``) and the pieces a run shares; a whole run —
many leases in flight, their records written together — is ``leases.services.transfer_run``.
Claim → call → record, never a row lock across an HTTP call, and one writer:

1. **Claim** due leases (``select_for_update(skip_locked=True)`` on PostgreSQL, a conditional
   UPDATE per lease on SQLite) by writing ``claimed_until``/``claimed_by``. A heartbeat thread
   renews the claims of the run's leases while it works, and every write re-checks the claim
   (``claim=owner`` in the transition function): a lease whose claim lapsed (the process stalled
   longer than ``LEASE_CLAIM_TTL``) is ``StaleLease`` and left to whoever holds it now.
2. **Start**: ``active → transferring`` with the target team chosen from the seat counters
   without locks and its seat reserved by the transition function, which locks only that team's
   row and re-checks its counter (the next candidate when the seat went meanwhile; event
   ``transfer_started``). If the entitlement is over (``ends_at`` passed) there is no target.
   Open leases of a **dead** team start the same way (``evacuation``), ``pending`` ones included.
3. **Invite** into the target team, then record ``transfer_step = invited`` (event ``invited``).
   A resumed transfer with that step never invites again. A target that died meanwhile is
   replaced (event ``target_chosen``).
4. **Remove** from the old team (404 is done; a dead team is skipped and recorded), then in one
   transaction the ``left_old_team`` event and ``transferring → pending`` on the new team (event
   ``transferred``) — or ``→ expired``.

Before each provider call the lease is re-read: a claim lost stops the work on it; an operator's
cancel request is honoured (the lease is cancelled and the seats it holds freed). Transient
failures (provider 429/5xx/timeouts, no free seat) schedule a retry with exponential backoff and
jitter in ``next_attempt_at``; after ``LEASE_TRANSFER_MAX_ATTEMPTS`` failed attempts, or on a
permanent provider error, the lease goes ``failed`` — with the invite to the next team withdrawn
(checking that the member did not accept it meanwhile) and where the member really is recorded —
and people are alerted once. One lease's trouble never aborts the run.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from leases import events
from leases.models import LeaseStatus, MemberLease, Team, TransferStep
from leases.providers import ProviderError, TeamDeadError, provider_for
from leases.selectors import leases_due_for_transfer, team_choices
from leases.services.cancellation import lease_cancel_claimed
from leases.services.health import team_record_provider_error
from leases.services.invites import seat_free, seat_whereabouts
from leases.services.transitions import (
    UNCLAIMED,
    IllegalTransitionError,
    LeaseError,
    StaleLease,
    claim_deadline,
    lease_step,
    lease_transition,
    seat_take_first,
)
from leasesite.notify import alert_send

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["UNCLAIMED", "TransferOutcome", "TransferRunResult", "lease_transfer", "transfers_run"]


class NoTargetTeamError(Exception):
    """No team has a free seat for this lease right now (transient: seats free up)."""


class CancelRequested(Exception):  # noqa: N818 - control flow: an operator asked to cancel
    """An operator asked to cancel the lease while this worker held it."""


# The steps of a transfer that call a provider, in the operator's words (the lease page and the
# alert say e.g. "邀请加入团队 B 失败：POST invites: HTTP 500").
STEP_WORDS = {
    "invite": gettext_lazy("Invite to team %(team)s failed: %(error)s"),
    "removal": gettext_lazy("Removal from team %(team)s failed: %(error)s"),
    "invite withdrawal": gettext_lazy("Withdrawing the invite to team %(team)s failed: %(error)s"),
}


class TeamCallError(ProviderError):
    """A provider error with the team and the step it happened in, in words for the operator."""

    def __init__(self, team: Team, step: str, error: ProviderError) -> None:
        words = STEP_WORDS.get(step, gettext_lazy("%(step)s at team %(team)s failed: %(error)s"))
        super().__init__(str(words) % {"team": team.name, "error": error, "step": step}, status=error.status)
        self.team = team
        self.transient = error.transient


@dataclass
class TransferOutcome:
    lease_id: int
    email: str
    outcome: str  # transferred | expired | retry | failed | cancelled | skipped | stale | would_*
    detail: str = ""


@dataclass
class TransferRunResult:
    claimed: int = 0
    outcomes: list[TransferOutcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    def summary(self) -> dict[str, int]:
        keys = (
            "transferred",
            "expired",
            "retry",
            "failed",
            "cancelled",
            "skipped",
            "stale",
            "would_transfer",
            "would_expire",
        )
        return {"claimed": self.claimed, **{k: self.count(k) for k in keys if self.count(k)}}


def transfer_backoff_seconds(attempts: int) -> float:
    """Exponential backoff with jitter: base × 2^(attempts-1), capped, then scaled by 0.5–1.0."""
    base = settings.LEASE_TRANSFER_BACKOFF_SECONDS
    ceiling = settings.LEASE_TRANSFER_BACKOFF_MAX_SECONDS
    delay = min(ceiling, base * (2 ** max(0, attempts - 1)))
    return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not cryptography


# -- claiming ----------------------------------------------------------------------------------------
def leases_claim_due(
    *,
    owner: str,
    batch_size: int,
    email: str | None = None,
    now: datetime | None = None,
    exclude_ids: Iterable[int] = (),
) -> list[int]:
    """Claim up to ``batch_size`` due leases for ``owner`` (not those of ``exclude_ids``)."""
    now = now or timezone.now()
    until = claim_deadline(now)
    due = leases_due_for_transfer(now=now)
    if email:
        due = due.filter(email__iexact=email)
    exclude_ids = list(exclude_ids)
    if exclude_ids:
        due = due.exclude(pk__in=exclude_ids)
    due = due.order_by("expires_at", "pk")
    if connection.features.has_select_for_update_skip_locked:
        with transaction.atomic():
            ids = list(due.select_for_update(skip_locked=True, of=("self",)).values_list("pk", flat=True)[:batch_size])
            if ids:
                MemberLease.objects.filter(pk__in=ids).update(claimed_until=until, claimed_by=owner)
        return ids
    claimed = []
    for lease_id in due.values_list("pk", flat=True)[:batch_size]:
        # The count says who won: the UPDATE re-checks "due and unclaimed" atomically.
        if leases_due_for_transfer(now=now).filter(pk=lease_id).update(claimed_until=until, claimed_by=owner) == 1:
            claimed.append(lease_id)
    return claimed


# -- choosing the next team ---------------------------------------------------------------------------
def _target_candidates(lease: MemberLease, now: datetime) -> list[Team]:
    """The other teams of the lease's pool with a free seat, best first (read without locks)."""
    choices = team_choices(
        term_months=lease.term_months,
        email=lease.email,
        exclude_team_ids=(lease.team_id,),
        pool=lease.team.pool,
        now=now,
    )
    return [choice.team for choice in choices]


def _best_target(lease: MemberLease, now: datetime) -> Team | None:
    """The best other team of the lease's pool with a free seat, or None (a preview: no seat taken)."""
    candidates = _target_candidates(lease, now)
    return candidates[0] if candidates else None


def _no_target(lease: MemberLease) -> NoTargetTeamError:
    return NoTargetTeamError(_("no other team of pool %(pool)s has a free seat") % {"pool": lease.team.pool})


def _entitlement_over(lease: MemberLease, now: datetime) -> bool:
    return lease.ends_at is not None and lease.ends_at <= now


def _load(lease_id: int) -> MemberLease:
    return MemberLease.objects.select_related("team", "transfer_team").get(pk=lease_id)


def _checkpoint(lease_id: int, owner: str) -> MemberLease:
    """Re-read the lease before a provider call: still ours? an operator's cancel waiting?"""
    lease = _load(lease_id)
    if lease.claimed_by != owner or lease.claimed_until is None or lease.claimed_until < timezone.now():
        raise StaleLease(lease, "claim lost")
    if lease.cancel_requested_at is not None:
        raise CancelRequested()
    return lease


# -- one lease ------------------------------------------------------------------------------------------
def lease_transfer(*, lease_id: int, owner: str, now: datetime | None = None) -> TransferOutcome:
    """Advance one lease claimed by ``owner`` as far as it goes; see the module docstring. Never
    raises for one lease's trouble: the outcome says what happened."""
    now = now or timezone.now()
    lease: MemberLease | None = None
    try:
        lease = _checkpoint(lease_id, owner)
        if lease.status in (LeaseStatus.ACTIVE, LeaseStatus.PENDING):
            lease = lease_transfer_start(lease=lease, now=now, owner=owner)
        if lease.status != LeaseStatus.TRANSFERRING:
            return TransferOutcome(lease.pk, lease.email, "skipped", f"lease is {lease.status}")
        return _advance(lease, now, owner)
    except CancelRequested:
        return _honour_cancel(lease_id, owner)
    except StaleLease as exc:
        return TransferOutcome(lease_id, _email_of(lease, lease_id), "stale", exc.reason)
    except IllegalTransitionError as exc:
        return TransferOutcome(lease_id, _email_of(lease, lease_id), "skipped", str(exc))
    except (ProviderError, NoTargetTeamError) as exc:
        return _record_failure(lease_id, exc, now, owner)


def _email_of(lease: MemberLease | None, lease_id: int) -> str:
    if lease is not None:
        return lease.email
    return MemberLease.objects.filter(pk=lease_id).values_list("email", flat=True).first() or ""


def lease_transfer_start(
    *, lease: MemberLease, now: datetime, owner: str, actor_id: int | None = None, forced: bool = False
) -> MemberLease:
    """active (or, evacuating a dead team, pending) → transferring, with the target team chosen
    under the pool's team locks."""
    ending = _entitlement_over(lease, now)
    evacuation = lease.team.is_dead
    from_team, expires_at = lease.team, lease.expires_at

    def start(target: Team | None) -> MemberLease:
        started, _changed = lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.TRANSFERRING,
            actor_id=actor_id,
            claim=owner,
            expect_from=[LeaseStatus.ACTIVE, LeaseStatus.PENDING] if evacuation else [LeaseStatus.ACTIVE],
            changes={
                "transfer_team": target,
                "transfer_step": TransferStep.NONE,
                "next_attempt_at": None,
                "attempts": 0,
            },
            **events.transfer_started(
                from_team=from_team,
                to_team=target,
                term_expired_at=expires_at,
                entitlement_over=ending,
                forced=forced,
                evacuation=evacuation,
            ),
        )
        return started

    # The target's seat is reserved in the same transaction as the start (each attempt is one
    # transition, one transaction: no outer transaction, so no savepoint round trips); without a
    # free seat anywhere the lease still starts (the retry looks again).
    seated = None if ending else seat_take_first(teams=_target_candidates(lease, now), attempt=start)
    if seated is None:
        start(None)
    return _load(lease.pk)


def _ensure_target(lease: MemberLease, now: datetime, owner: str) -> MemberLease:
    """A transfer without a target, or whose target died or left service, gets a (new) one."""
    target = lease.transfer_team
    if target is not None and target.is_active and not target.is_dead:
        return lease
    if target is not None and lease.transfer_step == TransferStep.INVITED:
        # The invite sent to the old target is withdrawn where possible (a dead team cannot be
        # reached; the orphan check lists stray invites).
        _withdraw_invite(lease, target)

    def choose(new_target: Team) -> MemberLease:
        # The old target's reserved seat is released and the new one's taken in one transition.
        return lease_step(
            lease_id=lease.pk,
            claim=owner,
            changes={"transfer_team": new_target, "transfer_step": TransferStep.NONE},
            **events.target_chosen(
                to_team=new_target,
                previous=target,
                reason="" if target is None else "the previous target can no longer take members",
            ),
        )

    if seat_take_first(teams=_target_candidates(lease, now), attempt=choose) is None:
        raise _no_target(lease)
    return _load(lease.pk)


def _call(team: Team, step: str, call: Callable[[], T]) -> T:
    """Call ``team``'s provider: what the error says about the team is recorded (401/403/402 mark
    it dead), and the error names the team and the step."""
    try:
        return call()
    except ProviderError as exc:
        team_record_provider_error(team=team, error=exc, during=step)
        raise TeamCallError(team, step, exc) from exc


def _team_died(exc: TeamCallError) -> bool:
    return isinstance(exc.__cause__, TeamDeadError)


def _advance(lease: MemberLease, now: datetime, owner: str) -> TransferOutcome:
    ending = _entitlement_over(lease, now)
    if not ending:
        lease = _ensure_target(lease, now, owner)
        if lease.transfer_step == TransferStep.NONE:
            lease = _checkpoint(lease.pk, owner)
            target = lease.transfer_team
            email = lease.email
            _call(target, "invite", lambda: provider_for(target).invite(email))
            lease = lease_step(
                lease_id=lease.pk,
                claim=owner,
                changes={"transfer_step": TransferStep.INVITED},
                **events.invited(team=target, transfer=True),
            )
            # (re-read by the checkpoint below, before the next provider call)

    lease = _checkpoint(lease.pk, owner)
    withdrawn_from = None
    if ending and lease.transfer_step == TransferStep.INVITED and lease.transfer_team is not None:
        # The entitlement ended while the lease was moving: the invite already sent to the next
        # team is withdrawn (and a seat there freed) before the lease ends; a failure retries.
        withdrawn_from = _withdraw_before_expiry(lease)
    old_team = lease.team
    left = leave_old_team(team=old_team, email=lease.email, member_id=lease.provider_member_id)
    with transaction.atomic():
        lease_step(lease_id=lease.pk, claim=owner, **left)
        if ending:
            lease_transition(
                lease_id=lease.pk,
                to_status=LeaseStatus.EXPIRED,
                claim=owner,
                expect_from=[LeaseStatus.TRANSFERRING],
                changes={**UNCLAIMED, "next_attempt_at": None, "last_error": ""},
                **events.expired(ends_at=lease.ends_at, team=old_team, withdrawn_from=withdrawn_from),
            )
            return TransferOutcome(lease.pk, lease.email, "expired", old_team.name)
        new_team = lease.transfer_team
        lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.PENDING,
            claim=owner,
            expect_from=[LeaseStatus.TRANSFERRING],
            changes=arrival_changes(new_team),
            **events.transferred(from_team=old_team, to_team=new_team),
        )
    return TransferOutcome(lease.pk, lease.email, "transferred", f"{old_team.name} -> {new_team.name}")


def leave_old_team(*, team: Team, email: str, member_id: str) -> events.Event:
    """Free the member's seat in the team a transfer leaves, and say so as the ``left_old_team``
    event: freed (how), or skipped because the team is dead (already, or as this call found).
    Other provider errors raise ``TeamCallError``."""
    if team.is_dead:
        return events.left_old_team(team=team, skipped="team is dead: the removal was skipped")
    try:
        freed = _call(team, "removal", lambda: seat_free(team=team, email=email, member_id=member_id))
    except TeamCallError as exc:
        if not _team_died(exc):
            raise
        return events.left_old_team(team=team, skipped=f"team is dead ({exc.__cause__}): the removal was skipped")
    return events.left_old_team(team=team, freed=freed)


def arrival_changes(team: Team) -> dict[str, object]:
    """What ``transferring → pending`` writes: seated (invited) in ``team`` now, its term to start
    when the member joins there, the transfer's bookkeeping and claim let go."""
    return {
        "team": team,
        "invited_at": timezone.now(),
        "joined_at": None,
        "expires_at": None,
        "provider_member_id": "",
        "missed_syncs": 0,
        "attempts": 0,
        "next_attempt_at": None,
        "last_error": "",
        **UNCLAIMED,
    }


def _withdraw_before_expiry(lease: MemberLease) -> Team:
    target, email = lease.transfer_team, lease.email
    if not target.is_dead:  # a dead team cannot be reached; the orphan check lists what is left
        _call(target, "invite withdrawal", lambda: seat_free(team=target, email=email))
    return target


def _withdraw_invite(lease: MemberLease, target: Team) -> dict:
    """Withdraw the invite to ``target`` — and if the member had already accepted it, remove them
    from ``target`` (a 404 to the withdrawal alone does not mean they are not there)."""
    if target.is_dead:
        return {"invite_withdrawn": False, "withdraw_error": f"team {target.name} is dead"}
    try:
        freed = seat_free(team=target, email=lease.email)
    except ProviderError as exc:
        team_record_provider_error(team=target, error=exc, during="invite withdrawal")
        return {"invite_withdrawn": False, "withdraw_error": f"{target.name}: {str(exc)[:200]}"}
    return {"invite_withdrawn": True, "removed_from_target": bool(freed.get("member_id"))}


def _record_failure(lease_id: int, exc: Exception, now: datetime, owner: str) -> TransferOutcome:
    lease = _load(lease_id)
    message = (str(exc) or type(exc).__name__)[:500]
    failed_team = exc.team if isinstance(exc, TeamCallError) else None
    if lease.status != LeaseStatus.TRANSFERRING:
        return TransferOutcome(lease.pk, lease.email, "skipped", message)
    attempts = lease.attempts + 1
    # A target that died under us is replaced by the next attempt, at once.
    dead_target = isinstance(exc, TeamCallError) and _team_died(exc)
    permanent = isinstance(exc, ProviderError) and not exc.transient and not dead_target
    try:
        if permanent or attempts >= settings.LEASE_TRANSFER_MAX_ATTEMPTS:
            return _give_up(lease, message, attempts, permanent, failed_team, owner)
        next_attempt_at = now if dead_target else now + timedelta(seconds=transfer_backoff_seconds(attempts))
        lease_step(
            lease_id=lease.pk,
            claim=owner,
            changes={"attempts": attempts, "last_error": message, "next_attempt_at": next_attempt_at, **UNCLAIMED},
            **events.transfer_retry(error=message, attempt=attempts, next_attempt_at=next_attempt_at, team=failed_team),
        )
    except StaleLease as stale:
        return TransferOutcome(lease.pk, lease.email, "stale", stale.reason)
    return TransferOutcome(lease.pk, lease.email, "retry", message)


def _give_up(
    lease: MemberLease, message: str, attempts: int, permanent: bool, failed_team: Team | None, owner: str
) -> TransferOutcome:
    """transferring → failed: withdraw the invite to the next team (checking the members), record
    where the member really is, alert once."""
    withdrawal = {}
    if lease.transfer_team is not None and lease.transfer_step == TransferStep.INVITED:
        withdrawal = _withdraw_invite(lease, lease.transfer_team)
    teams = [lease.team] + ([lease.transfer_team] if lease.transfer_team else [])
    whereabouts = {**withdrawal, **seat_whereabouts(teams=teams, email=lease.email)}
    seen = ", ".join(whereabouts["member_of"]) or _("no team")
    if whereabouts.get("whereabouts_unknown"):
        seen += _(" (could not check: %(teams)s)") % {"teams": ", ".join(whereabouts["whereabouts_unknown"])}
    last_error = _("%(error)s — member of: %(teams)s") % {"error": message, "teams": seen}
    lease_transition(
        lease_id=lease.pk,
        to_status=LeaseStatus.FAILED,
        claim=owner,
        expect_from=[LeaseStatus.TRANSFERRING],
        changes={"attempts": attempts, "last_error": last_error[:1000], "next_attempt_at": None, **UNCLAIMED},
        **events.transfer_failed(
            error=message, attempts=attempts, permanent=permanent, failed_team=failed_team, whereabouts=whereabouts
        ),
    )
    alert_send(
        title=_("Lease transfer failed: %(email)s") % {"email": lease.email},
        body=_(
            "Lease %(id)s (%(email)s, team %(team)s) failed after %(attempts)d attempt(s): %(error)s. "
            "Member of: %(teams)s. It needs an operator (admin: retry, reset or cancel)."
        )
        % {
            "id": lease.pk,
            "email": lease.email,
            "team": lease.team.name,
            "attempts": attempts,
            "error": message,
            "teams": seen,
        },
        level="error",
        key=f"leases:lease:{lease.pk}:failed",
    )
    return TransferOutcome(lease.pk, lease.email, "failed", message)


def _honour_cancel(lease_id: int, owner: str) -> TransferOutcome:
    lease = _load(lease_id)
    try:
        outcome = lease_cancel_claimed(lease_id=lease_id, owner=owner, actor_id=None, reason=lease.cancel_reason)
    except LeaseError as exc:
        return TransferOutcome(lease.pk, lease.email, "stale", str(exc))
    detail = _("cancelled on request") + (
        f" ({', '.join(outcome.seats_not_freed)} not freed)" if outcome.seats_not_freed else ""
    )
    return TransferOutcome(lease.pk, lease.email, "cancelled", detail)


# -- runs ---------------------------------------------------------------------------------------------
def guarded(lease_id: int, step: Callable[[], TransferOutcome]) -> TransferOutcome:
    """One lease's step, whatever happens to it: a database error on one lease is its outcome,
    not the run's end."""
    try:
        return step()
    except DatabaseError as exc:
        logger.exception("transfer of lease %s hit a database error", lease_id)
        close_old_connections()
        return TransferOutcome(lease_id, "", "skipped", f"database error: {type(exc).__name__}")


def transfers_run(
    *, email: str | None = None, limit: int | None = None, now: datetime | None = None, owner: str | None = None
) -> TransferRunResult:
    """Claim and move due leases until none is left (or ``limit`` were claimed), with up to
    ``LEASE_TRANSFER_CONCURRENCY`` provider calls in flight (``leases.services.transfer_run``)."""
    from leases.services.transfer_run import TransferRun

    result = TransferRun(owner=owner or f"transfer-{uuid.uuid4().hex[:12]}", now=now, email=email, limit=limit).run()
    if result.claimed:
        # Expiries and cancels of this run freed seats: the waiting list goes first.
        from leases.services.waiting import waiting_drain

        waiting_drain()
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
        target = lease.transfer_team or _best_target(lease, now)
        detail = f"{lease.team.name} -> {target.name if target else '(no free seat)'}"
        result.outcomes.append(TransferOutcome(lease.pk, lease.email, "would_transfer", detail))
    return result
