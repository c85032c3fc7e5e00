"""The only writer of ``MemberLease.status``.

``leases_transition`` locks the rows (in primary-key order, so two callers never deadlock), checks
the allowed-transitions table, applies the field changes, saves and writes one ``LeaseEvent`` per
changed lease, all in one transaction. A lease already in the target state is left alone (no-op,
no event). The batch form exists so a join sync of 1,000 leases costs a constant number of
queries; ``lease_transition`` is the single-lease form that raises on a refused transition.

Never call a provider while inside this function's transaction: claim → call → record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction
from django.db.models import Case, Value, When
from django.db.models.functions import Cast
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import ALLOWED_TRANSITIONS, LeaseAction, LeaseEvent, LeaseStatus, MemberLease, TransferStep

ChangesSpec = dict[str, Any] | Callable[[MemberLease], dict[str, Any]] | None
DetailSpec = dict[str, Any] | Callable[[MemberLease], dict[str, Any]] | None


class LeaseError(Exception):
    """A domain error with a message fit for an operator or a customer."""


class IllegalTransitionError(LeaseError):
    def __init__(self, lease: MemberLease, to_status: str) -> None:
        self.lease_id = lease.pk
        self.from_status = lease.status
        self.to_status = to_status
        super().__init__(
            _("Lease %(id)s is %(from)s; it cannot become %(to)s.")
            % {
                "id": lease.pk,
                "from": LeaseStatus(lease.status).label,
                "to": LeaseStatus(to_status).label,
            }
        )


@dataclass
class TransitionResult:
    changed: list[MemberLease] = field(default_factory=list)
    unchanged: list[MemberLease] = field(default_factory=list)  # already in the target state
    refused: list[IllegalTransitionError] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


def is_allowed(from_status: str, to_status: str) -> bool:
    return to_status in ALLOWED_TRANSITIONS.get(from_status, frozenset())


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


def leases_transition(
    *,
    lease_ids: Iterable[int],
    to_status: str,
    action: str,
    actor_id: int | None = None,
    changes: ChangesSpec = None,
    detail: DetailSpec = None,
    expect_from: Iterable[str] | None = None,
) -> TransitionResult:
    """Move each lease to ``to_status``; see the module docstring.

    ``changes`` (a dict, or a function of the locked lease) sets other fields in the same save;
    ``expect_from`` narrows the allowed source states further (a sync only activates ``pending``).
    """
    to_status = LeaseStatus(to_status)
    action = LeaseAction(action)
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
            if lease.status == to_status:
                result.unchanged.append(lease)
                continue
            if not is_allowed(lease.status, to_status) or (narrowed is not None and lease.status not in narrowed):
                result.refused.append(IllegalTransitionError(lease, to_status))
                continue
            from_status = lease.status
            values = _resolve(changes, lease)
            if to_status != LeaseStatus.TRANSFERRING:
                # Transfer bookkeeping only exists while transferring (a DB constraint says so).
                values.setdefault("transfer_team", None)
                values.setdefault("transfer_step", TransferStep.NONE)
            for name, value in values.items():
                setattr(lease, name, value)
                fields_written.add(MemberLease._meta.get_field(name).attname)
            lease.status = to_status
            to_save.append(lease)
            events.append(
                LeaseEvent(
                    lease=lease,
                    action=action,
                    from_status=from_status,
                    to_status=to_status,
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


def lease_transition(
    *,
    lease_id: int,
    to_status: str,
    action: str,
    actor_id: int | None = None,
    changes: ChangesSpec = None,
    detail: DetailSpec = None,
    expect_from: Iterable[str] | None = None,
) -> tuple[MemberLease, bool]:
    """Single-lease form. Returns (lease, changed); raises IllegalTransitionError or DoesNotExist."""
    result = leases_transition(
        lease_ids=[lease_id],
        to_status=to_status,
        action=action,
        actor_id=actor_id,
        changes=changes,
        detail=detail,
        expect_from=expect_from,
    )
    if result.missing:
        raise MemberLease.DoesNotExist(f"lease {lease_id} does not exist")
    if result.refused:
        raise result.refused[0]
    if result.changed:
        return result.changed[0], True
    return result.unchanged[0], False


def lease_event_record(
    *, lease_id: int, action: str, detail: dict[str, Any] | None = None, actor_id: int | None = None, **changes: Any
) -> LeaseEvent:
    """Record a step that does not change the status (an invite, a retry), with its field changes.

    The row is locked so the step and its event are written together or not at all.
    """
    if "status" in changes:
        raise ValueError("status changes go through leases_transition")
    with transaction.atomic():
        lease = MemberLease.objects.select_for_update(of=("self",)).get(pk=lease_id)
        for name, value in changes.items():
            setattr(lease, name, value)
        if changes:
            lease.save(update_fields=list(changes))
        return LeaseEvent.objects.create(
            lease=lease,
            action=LeaseAction(action),
            from_status=lease.status,
            to_status=lease.status,
            actor_id=actor_id,
            detail=detail or {},
        )
