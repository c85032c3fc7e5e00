"""The only writer of a lease's workflow fields (status, team, transfer bookkeeping, claims,
attempts, times).

``leases_transition`` locks the rows (in primary-key order, so two callers never deadlock) and,
per lease, compares-and-swaps: the status must allow the change (the transition table, or the
steps table for a change that keeps the status), ``expect_from`` must list the current status,
and when the caller works under a claim (``claim=owner``) the lease must still be claimed by that
owner — or, with ``unclaimed=True``, by nobody alive. Then it applies the field changes, saves and
writes one ``LeaseEvent`` per lease, all in one transaction. A lease already in the target status
is left alone (no-op, no event). A lease whose claim was lost is reported ``stale`` (the caller
must stop working on it: someone else does); one the table refuses is ``refused``.

The batch form exists so a join sync of 1,000 leases costs a constant number of queries;
``lease_transition`` (status changes) and ``lease_step`` (steps) are the single-lease forms that
raise. The event's ``action`` and ``detail`` come from ``leases.events`` (one helper per event).
Claims themselves are taken, renewed and released here too (``leases_claim_due`` lives with the
executor because it selects what is due).

Never call a provider while inside this function's transaction: claim → call → record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Q, Value, When
from django.db.models.functions import Cast
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import (
    ALLOWED_TRANSITIONS,
    FINAL_STATUSES,
    STEP_ACTIONS,
    LeaseAction,
    LeaseEvent,
    LeaseStatus,
    MemberLease,
    TransferStep,
)

ChangesSpec = dict[str, Any] | Callable[[MemberLease], dict[str, Any]] | None
DetailSpec = dict[str, Any] | Callable[[MemberLease], dict[str, Any]] | None

# Written when a worker lets go of a lease (its step recorded, or given up).
UNCLAIMED = {"claimed_until": None, "claimed_by": ""}


class LeaseError(Exception):
    """A domain error with a message fit for an operator or a customer."""


class IllegalTransitionError(LeaseError):
    def __init__(self, lease: MemberLease, to_status: str, action: str = "") -> None:
        self.lease_id = lease.pk
        self.from_status = lease.status
        self.to_status = to_status
        self.action = action
        if to_status == lease.status:
            message = _("Lease %(id)s is %(from)s; %(action)s is not possible now.") % {
                "id": lease.pk,
                "from": LeaseStatus(lease.status).label,
                "action": LeaseAction(action).label if action in LeaseAction.values else action,
            }
        else:
            message = _("Lease %(id)s is %(from)s; it cannot become %(to)s.") % {
                "id": lease.pk,
                "from": LeaseStatus(lease.status).label,
                "to": LeaseStatus(to_status).label,
            }
        super().__init__(message)


class StaleLease(LeaseError):  # noqa: N818 - reads as a state: "the lease went stale under you"
    """The caller's view of the lease is out of date: its claim was lost (another worker or an
    operator holds the lease now). The caller stops working on this lease; others go on."""

    def __init__(self, lease: MemberLease, reason: str) -> None:
        self.lease_id = lease.pk
        self.reason = reason
        super().__init__(
            _("Lease %(id)s is being worked on elsewhere (%(reason)s); try again shortly.")
            % {"id": lease.pk, "reason": reason}
        )


@dataclass
class TransitionResult:
    changed: list[MemberLease] = field(default_factory=list)
    unchanged: list[MemberLease] = field(default_factory=list)  # already in the target state
    refused: list[IllegalTransitionError] = field(default_factory=list)
    stale: list[StaleLease] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


def is_allowed(from_status: str, to_status: str) -> bool:
    return to_status in ALLOWED_TRANSITIONS.get(from_status, frozenset())


def is_step_allowed(status: str, action: str) -> bool:
    return action in STEP_ACTIONS.get(status, frozenset())


def claim_is_live(lease: MemberLease, now: datetime) -> bool:
    return bool(lease.claimed_by) and lease.claimed_until is not None and lease.claimed_until >= now


def _resolve(spec: ChangesSpec | DetailSpec, lease: MemberLease) -> dict[str, Any]:
    if spec is None:
        return {}
    return dict(spec(lease) if callable(spec) else spec)


def _write_fields(leases: list[MemberLease], attnames: list[str]) -> None:
    """Like ``bulk_update`` (one UPDATE per 500 leases), but a value every lease of the batch shares
    is written as itself. ``bulk_update`` wraps each field in a CASE with a branch per lease: for a
    join sync's 500 activations (9 fields, 6 of them the same for all) that was half a second of
    query building per team and a CASE of 4,500 branches for PostgreSQL to evaluate row by row."""
    size = min(500, connection.ops.bulk_batch_size(["pk", "pk", *attnames], leases) or 500)
    for start in range(0, len(leases), size):
        batch = leases[start : start + size]
        values: dict[str, Any] = {}
        for attname in attnames:
            model_field = MemberLease._meta.get_field(attname)
            column = [getattr(lease, attname) for lease in batch]
            as_sql = [v if hasattr(v, "resolve_expression") else Value(v, output_field=model_field) for v in column]
            if all(value == column[0] for value in column[1:]):
                values[attname] = as_sql[0]
            else:
                whens = [When(pk=lease.pk, then=value) for lease, value in zip(batch, as_sql, strict=True)]
                case = Case(*whens, output_field=model_field)
                if connection.features.requires_casted_case_in_updates:  # as bulk_update: PostgreSQL
                    case = Cast(case, output_field=model_field)
                values[attname] = case
        MemberLease.objects.filter(pk__in=[lease.pk for lease in batch]).update(**values)


def _check_claim(lease: MemberLease, *, claim: str | None, unclaimed: bool, now: datetime) -> str:
    """Why the caller may not write this lease now ("" when it may)."""
    if claim is not None:
        if lease.claimed_by != claim:
            return "claim lost" if not lease.claimed_by else "claimed by another worker"
        if lease.claimed_until is None or lease.claimed_until < now:
            return "claim expired"
    elif unclaimed and claim_is_live(lease, now):
        return "a transfer is working on it"
    return ""


def leases_transition(
    *,
    lease_ids: Iterable[int],
    action: str,
    to_status: str | None = None,
    actor_id: int | None = None,
    changes: ChangesSpec = None,
    detail: DetailSpec = None,
    expect_from: Iterable[str] | None = None,
    claim: str | None = None,
    unclaimed: bool = False,
) -> TransitionResult:
    """Move each lease to ``to_status`` (or, without it, record the step ``action`` in its current
    status); see the module docstring.

    ``changes`` (a dict, or a function of the locked lease) sets other fields in the same save;
    ``expect_from`` narrows the allowed source states further (a sync only activates ``pending``);
    ``claim`` is the caller's claim owner (the lease must still be held by it); ``unclaimed`` asks
    that no live claim holds the lease (join sync, operators).
    """
    action = LeaseAction(action)
    target = LeaseStatus(to_status) if to_status is not None else None
    ids = sorted(set(lease_ids))
    result = TransitionResult()
    if not ids:
        return result
    narrowed = set(expect_from) if expect_from is not None else None
    now = timezone.now()
    with transaction.atomic():
        locked = list(MemberLease.objects.filter(pk__in=ids).order_by("pk").select_for_update(of=("self",)))
        found = {lease.pk for lease in locked}
        result.missing = [pk for pk in ids if pk not in found]
        to_save: list[MemberLease] = []
        events: list[LeaseEvent] = []
        fields_written: set[str] = {"status"}
        for lease in locked:
            from_status = lease.status
            new_status = target or from_status
            if target is not None and from_status == target:
                result.unchanged.append(lease)
                continue
            stale_reason = _check_claim(lease, claim=claim, unclaimed=unclaimed, now=now)
            if stale_reason:
                result.stale.append(StaleLease(lease, stale_reason))
                continue
            allowed = (
                is_allowed(from_status, new_status) if target is not None else is_step_allowed(from_status, action)
            )
            if not allowed or (narrowed is not None and from_status not in narrowed):
                result.refused.append(IllegalTransitionError(lease, new_status, action))
                continue
            values = _resolve(changes, lease)
            if "status" in values:
                raise ValueError("the status is the transition's to_status, not a change")
            if new_status != LeaseStatus.TRANSFERRING:
                # Transfer bookkeeping only exists while transferring (a DB constraint says so).
                values.setdefault("transfer_team", None)
                values.setdefault("transfer_step", TransferStep.NONE)
            if new_status in FINAL_STATUSES:
                # A final lease holds no claim and no pending request (constraints say so too).
                values.setdefault("claimed_until", None)
                values.setdefault("claimed_by", "")
                values.setdefault("cancel_requested_at", None)
                values.setdefault("next_attempt_at", None)
            for name, value in values.items():
                setattr(lease, name, value)
                fields_written.add(MemberLease._meta.get_field(name).attname)
            lease.status = new_status
            to_save.append(lease)
            events.append(
                LeaseEvent(
                    lease=lease,
                    action=action,
                    from_status=from_status,
                    to_status=new_status,
                    actor_id=actor_id,
                    created_at=now,
                    detail=_resolve(detail, lease),
                )
            )
            result.changed.append(lease)
        if to_save:
            _write_fields(to_save, sorted(fields_written))
            LeaseEvent.objects.bulk_create(events, batch_size=500)
    return result


def _single(result: TransitionResult, lease_id: int) -> MemberLease | None:
    if result.missing:
        raise MemberLease.DoesNotExist(f"lease {lease_id} does not exist")
    if result.stale:
        raise result.stale[0]
    if result.refused:
        raise result.refused[0]
    return result.changed[0] if result.changed else None


def lease_transition(
    *,
    lease_id: int,
    to_status: str,
    action: str,
    actor_id: int | None = None,
    changes: ChangesSpec = None,
    detail: DetailSpec = None,
    expect_from: Iterable[str] | None = None,
    claim: str | None = None,
    unclaimed: bool = False,
) -> tuple[MemberLease, bool]:
    """Single-lease status change. Returns (lease, changed); raises IllegalTransitionError,
    StaleLease or DoesNotExist."""
    result = leases_transition(
        lease_ids=[lease_id],
        to_status=to_status,
        action=action,
        actor_id=actor_id,
        changes=changes,
        detail=detail,
        expect_from=expect_from,
        claim=claim,
        unclaimed=unclaimed,
    )
    changed = _single(result, lease_id)
    if changed is not None:
        return changed, True
    return result.unchanged[0], False


def lease_step(
    *,
    lease_id: int,
    action: str,
    actor_id: int | None = None,
    changes: ChangesSpec = None,
    detail: DetailSpec = None,
    expect_from: Iterable[str] | None = None,
    claim: str | None = None,
    unclaimed: bool = False,
) -> MemberLease:
    """Record a step that keeps the status (an invite, a retry, a note) with its field changes,
    under the same checks as a transition. Raises IllegalTransitionError, StaleLease or
    DoesNotExist."""
    result = leases_transition(
        lease_ids=[lease_id],
        action=action,
        actor_id=actor_id,
        changes=changes,
        detail=detail,
        expect_from=expect_from,
        claim=claim,
        unclaimed=unclaimed,
    )
    lease = _single(result, lease_id)
    assert lease is not None  # a step either changes the lease or raises
    return lease


# -- claims ----------------------------------------------------------------------------------------------
def claim_deadline(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) + timedelta(seconds=settings.LEASE_CLAIM_TTL)


def unclaimed_q(now: datetime) -> Q:
    return Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)


def lease_claim(*, lease_id: int, owner: str, now: datetime | None = None) -> bool:
    """Claim one open lease for ``owner`` (an operator action, a cancel); False if a live claim
    holds it. A conditional UPDATE: its count says who won."""
    now = now or timezone.now()
    return (
        MemberLease.objects.filter(unclaimed_q(now), pk=lease_id)
        .exclude(status__in=FINAL_STATUSES)
        .update(claimed_until=claim_deadline(now), claimed_by=owner)
        == 1
    )


def leases_claim_renew(*, lease_ids: Iterable[int], owner: str) -> int:
    """Push ``owner``'s claims on these leases forward (a long batch keeps what it works on).
    Returns how many are still held: a lease missing from the count was lost."""
    return MemberLease.objects.filter(pk__in=list(lease_ids), claimed_by=owner).update(claimed_until=claim_deadline())


def leases_release(*, lease_ids: Iterable[int], owner: str) -> None:
    MemberLease.objects.filter(pk__in=list(lease_ids), claimed_by=owner).update(**UNCLAIMED)


def lease_holds_claim(*, lease_id: int, owner: str, now: datetime | None = None) -> bool:
    """Re-check before a provider call: is this lease still ours?"""
    now = now or timezone.now()
    return MemberLease.objects.filter(pk=lease_id, claimed_by=owner, claimed_until__gte=now).exists()
