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

It is also the only writer of ``Team.seats_taken`` (how many seats our leases hold in a team,
DESIGN §5: pending, active, transferring and failed leases in their ``team``, and a transferring
lease's reserved seat in its ``transfer_team``): per lease it compares the seats held before and
after the change and moves the counters in the same transaction, team rows in primary-key order.
A seat *taken* is a conditional UPDATE (``seats_taken < capacity``, the team open for newcomers,
the provider's last listing not full) on that one row: the database re-checks the room on the
locked row, so two transactions racing for the last seat cannot both win. The loser gets
``TeamFullError`` (``result.full``) with nothing written, and ``seat_take_first`` moves on to
the next candidate team. ``lease_open`` creates a new lease (a redemption) under the same rule.

The batch form exists so a join sync of 1,000 leases costs a constant number of queries;
``lease_transition`` (status changes) and ``lease_step`` (steps) are the single-lease forms that
raise. The event's ``action`` and ``detail`` come from ``leases.events`` (one helper per event).
Claims themselves are taken, renewed and released here too (``leases_claim_due`` lives with the
executor because it selects what is due).

Never call a provider while inside this function's transaction: claim → call → record.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Cast, Coalesce
from django.db.models.lookups import LessThan
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
    Team,
    TeamHealth,
    TransferStep,
)
from leases.selectors import seat_counts_of, teams_seat_recount

T = TypeVar("T")

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


class TeamFullError(LeaseError):
    """The team chosen for a lease has no free seat any more (another transaction took the last
    one, it filled up at the provider, or it closed): nothing was written; try the next team."""

    def __init__(self, lease_id: int | None, team_id: int) -> None:
        self.lease_id = lease_id
        self.team_id = team_id
        super().__init__(_("Team %(team)s has no free seat left.") % {"team": team_id})


@dataclass
class TransitionResult:
    changed: list[MemberLease] = field(default_factory=list)
    unchanged: list[MemberLease] = field(default_factory=list)  # already in the target state
    refused: list[IllegalTransitionError] = field(default_factory=list)
    stale: list[StaleLease] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    full: list[TeamFullError] = field(default_factory=list)  # a seat to take was gone: not changed


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
    if connection.vendor == "postgresql" and not any(
        hasattr(getattr(lease, attname), "resolve_expression") for lease in leases for attname in attnames
    ):
        _write_fields_postgresql(leases, attnames)
        return
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


# Fields whose Python value is already what PostgreSQL stores (aware datetimes, ints, strings,
# foreign-key ids): ``get_db_prep_save`` would return it unchanged, at a cost per value.
_AS_IS_FIELDS = (
    models.DateTimeField,
    models.CharField,
    models.TextField,
    models.IntegerField,
    models.BooleanField,
    models.ForeignKey,
)


def _write_fields_postgresql(leases: list[MemberLease], attnames: list[str]) -> None:
    """The same write as one ``UPDATE … FROM unnest(<one array per column>)``: a handful of
    parameters whatever the batch size. The ORM's CASE with a ``When`` per lease and field cost
    ~1 ms of CPU per lease to build (a join sync of 10 × 500 activations spent 6 of its 7 seconds
    there, under the GIL, so syncing teams in parallel could not help). Values shared by every
    lease are one parameter each."""
    meta = MemberLease._meta
    quote = connection.ops.quote_name
    table, pk_column = quote(meta.db_table), quote(meta.pk.column)
    shared_sql, shared_params, arrays_sql, array_params, names = [], [], [], [], []
    for attname in attnames:
        model_field = meta.get_field(attname)
        # Django's own field classes only: a project field (an encrypted one) prepares its value.
        if isinstance(model_field, _AS_IS_FIELDS) and type(model_field).__module__.startswith("django.db.models"):
            column = [getattr(lease, attname) for lease in leases]
        else:
            column = [model_field.get_db_prep_save(getattr(lease, attname), connection) for lease in leases]
        db_type = model_field.db_type(connection)
        if all(value == column[0] for value in column[1:]):
            shared_sql.append(f"{quote(model_field.column)} = %s::{db_type}")
            shared_params.append(column[0])
        else:
            name = f"v{len(names)}"
            names.append(name)
            shared_sql.append(f"{quote(model_field.column)} = v.{name}")
            arrays_sql.append(f"%s::{db_type}[]")
            array_params.append(column)
    pks = [lease.pk for lease in leases]
    with connection.cursor() as cursor:
        # Names come from the model's meta, values are parameters: nothing a caller typed is SQL.
        if not names:
            sql = f"UPDATE {table} SET {', '.join(shared_sql)} WHERE {pk_column} = ANY(%s)"  # noqa: S608
            cursor.execute(sql, [*shared_params, pks])
            return
        source = f"unnest(%s::{meta.pk.db_type(connection)}[], {', '.join(arrays_sql)}) AS v(pk, {', '.join(names)})"
        sql = f"UPDATE {table} SET {', '.join(shared_sql)} FROM {source} WHERE {table}.{pk_column} = v.pk"  # noqa: S608
        cursor.execute(sql, [*shared_params, pks, *array_params])


def _insert_events(rows: list[dict[str, Any]]) -> None:
    """Write the events, given as field values by attname (``lease_id``, ``action``, ...). On
    PostgreSQL one ``INSERT … SELECT FROM unnest(...)``: an array for a column whose values
    differ, one parameter for a value every event shares (a join sync's 500 activations share
    their action, statuses, actor and time) — neither Django's bulk_create, which prepares every
    field of every row in Python, nor 500 model instances first. Elsewhere ``bulk_create``."""
    if connection.vendor != "postgresql":
        LeaseEvent.objects.bulk_create([LeaseEvent(**row) for row in rows], batch_size=500)
        return
    meta = LeaseEvent._meta
    quote = connection.ops.quote_name
    columns: list[str] = []
    sources: list[str] = []
    selected: list[str] = []
    params: list[Any] = []
    scalars: list[Any] = []
    for model_field in [f for f in meta.concrete_fields if not f.primary_key]:
        db_type = model_field.db_type(connection)
        raw = [row.get(model_field.attname) for row in rows]
        if db_type == "jsonb":  # as text, cast in SQL (psycopg would adapt each value on its own)
            values = [None if v is None else json.dumps(v, cls=model_field.encoder) for v in raw]
            db_type, cast = "text", "::jsonb"
        else:
            values = [model_field.get_db_prep_save(v, connection) for v in raw]
            cast = ""
        columns.append(quote(model_field.column))
        if all(value == values[0] for value in values[1:]):
            selected.append(f"%s::{db_type}{cast}")
            scalars.append(values[0])
        else:
            name = f"c{len(sources)}"
            sources.append(f"%s::{db_type}[]")
            params.append(values)
            selected.append(f"v.{name}{cast}")
    if not sources:  # every value shared (one event, say): the unnest needs one array to count rows
        sources.append("%s::integer[]")
        params.append([0] * len(rows))
    names = ", ".join(f"c{n}" for n in range(len(sources)))
    # Names come from the model's meta, values are parameters: nothing a caller typed is SQL.
    sql = f"INSERT INTO {quote(meta.db_table)} ({', '.join(columns)}) SELECT {', '.join(selected)} "
    sql += f"FROM unnest({', '.join(sources)}) AS v({names})"
    with connection.cursor() as cursor:
        cursor.execute(sql, [*scalars, *params])


# -- seats ---------------------------------------------------------------------------------------------
def _room_q(now: datetime) -> Q:
    """A team that may take one more of our leases: open for newcomers (DESIGN §4) and free by
    ``capacity - max(seats_taken, members and invites the provider showed)`` (the selectors'
    ``team_free_seats`` in SQL)."""
    return (
        Q(is_active=True, seats_taken__lt=F("capacity"))
        & ~Q(health=TeamHealth.DEAD)
        & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        & Q(LessThan(Coalesce("members_seen", 0) + Coalesce("invites_seen", 0), F("capacity")))
    )


def _seat_take(team_id: int, now: datetime, count: int = 1) -> bool:
    """``count`` seats more in ``team_id`` if it has room for all of them, re-checked by the
    database on the row it locks (a concurrent taker waits for our commit, then sees the new
    count)."""
    room = _room_q(now) & Q(seats_taken__lte=F("capacity") - count)
    return Team.objects.filter(room, pk=team_id).update(seats_taken=F("seats_taken") + count) == 1


def _seats_take_many(counts: dict[int, int], now: datetime) -> set[int]:
    """Take ``counts`` (team id -> seats) at once, each team all or nothing under the room rule
    of ``_room_q``; returns the teams that took theirs. One UPDATE on PostgreSQL (the rule
    compiled once by the ORM, then applied to every team of the batch), one per team elsewhere."""
    if not counts:
        return set()
    if connection.vendor != "postgresql" or len(counts) == 1:
        return {team_id for team_id, count in sorted(counts.items()) if _seat_take(team_id, now, count)}
    query = Team.objects.filter(_room_q(now)).query
    room_sql, room_params = query.where.as_sql(query.get_compiler(connection=connection), connection)
    table, pk = connection.ops.quote_name(Team._meta.db_table), connection.ops.quote_name(Team._meta.pk.column)
    taken = connection.ops.quote_name(Team._meta.get_field("seats_taken").column)
    capacity = connection.ops.quote_name(Team._meta.get_field("capacity").column)
    ids = sorted(counts)
    with connection.cursor() as cursor:
        # Names come from the model's meta and the room rule from the ORM; values are parameters.
        cursor.execute(
            f"UPDATE {table} SET {taken} = {table}.{taken} + v.n "  # noqa: S608
            f"FROM unnest(%s::bigint[], %s::integer[]) AS v(id, n) "
            f"WHERE {table}.{pk} = v.id AND {table}.{taken} + v.n <= {table}.{capacity} AND {room_sql} "
            f"RETURNING {table}.{pk}",
            [ids, [counts[team_id] for team_id in ids], *room_params],
        )
        return {row[0] for row in cursor.fetchall()}


def _seat_move(team_id: int, delta: int) -> None:
    Team.objects.filter(pk=team_id).update(seats_taken=F("seats_taken") + delta)


def _seats_apply(moves: dict[int, tuple[Counter[int], Counter[int]]], now: datetime) -> dict[int, int]:
    """Move the counters for several leases at once: ``moves`` maps a lease id to the seats it
    holds (team id -> seats) before and after its change. The seats taken are one conditional
    UPDATE for the whole batch (each team: room for all of its takers) — where a team has no room
    for all, lease by lease, in lease order; the seats given back are one UPDATE for every team
    together. Team rows are locked in primary-key order first, so two transitions never deadlock.

    Returns lease id -> the team whose seat it could not take. Such a lease changes nothing: what
    the batch took for it at other teams is given back in the same UPDATE."""
    per_team: dict[int, dict[int, int]] = {}
    for lease_id, (before, after) in moves.items():
        for team_id in set(before) | set(after):
            delta = after[team_id] - before[team_id]
            if delta:
                per_team.setdefault(team_id, {})[lease_id] = delta
    teams_lock(per_team)
    full: dict[int, int] = {}
    takers: dict[int, list[int]] = {}  # team id -> the leases taking a seat there, in lease order
    for team_id in sorted(per_team):
        for lease_id, delta in sorted(per_team[team_id].items()):
            if delta > 1:  # a lease holds at most one seat per team
                full[lease_id] = team_id
            elif delta == 1:
                takers.setdefault(team_id, []).append(lease_id)
    takers = {team_id: [n for n in ids if n not in full] for team_id, ids in takers.items()}
    took_all = _seats_take_many({team_id: len(ids) for team_id, ids in takers.items() if ids}, now)
    taken: dict[int, list[int]] = {}  # lease id -> teams where it took a seat
    for team_id, ids in sorted(takers.items()):
        if team_id in took_all:
            won = ids
        elif len(ids) <= 1:
            won = []
        else:  # no room for all of them: lease by lease, in lease order
            won = [lease_id for lease_id in ids if _seat_take(team_id, now)]
        for lease_id in ids:
            if lease_id in won:
                taken.setdefault(lease_id, []).append(team_id)
            else:
                full[lease_id] = team_id
    given_back: Counter[int] = Counter()
    for team_id, deltas in per_team.items():
        for lease_id, delta in deltas.items():
            if lease_id not in full and delta < 0:
                given_back[team_id] += delta
    for lease_id in full:
        for team_id in taken.get(lease_id, []):
            given_back[team_id] -= 1
    _seats_move({team_id: delta for team_id, delta in given_back.items() if delta})
    return full


def teams_lock(team_ids: Iterable[int]) -> None:
    """Lock these team rows in primary-key order (PostgreSQL; SQLite locks the whole database),
    for a transaction that moves the counters of several teams in more than one statement.

    ``FOR NO KEY UPDATE``, the lock an UPDATE of the counter takes itself: ``FOR UPDATE`` would
    also block the foreign-key checks (``FOR KEY SHARE``) of a lease written into the team, and
    two transfer runs deadlocked on that."""
    team_ids = sorted(set(team_ids))
    if len(team_ids) > 1 and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            table, pk = connection.ops.quote_name(Team._meta.db_table), connection.ops.quote_name(Team._meta.pk.column)
            # Names come from the model's meta, ids are a parameter.
            cursor.execute(f"SELECT 1 FROM {table} WHERE {pk} = ANY(%s) ORDER BY {pk} FOR NO KEY UPDATE", [team_ids])  # noqa: S608


def _seats_move(deltas: dict[int, int]) -> None:
    """Add ``deltas`` (team id -> seats) to the teams' counters: one UPDATE on PostgreSQL."""
    if not deltas:
        return
    if connection.vendor != "postgresql" or len(deltas) == 1:
        for team_id, delta in sorted(deltas.items()):
            _seat_move(team_id, delta)
        return
    table, pk = connection.ops.quote_name(Team._meta.db_table), connection.ops.quote_name(Team._meta.pk.column)
    column = connection.ops.quote_name(Team._meta.get_field("seats_taken").column)
    ids = sorted(deltas)
    with connection.cursor() as cursor:
        # Names come from the model's meta, values are parameters.
        cursor.execute(
            f"UPDATE {table} SET {column} = {table}.{column} + v.delta "  # noqa: S608
            f"FROM unnest(%s::bigint[], %s::integer[]) AS v(id, delta) WHERE {table}.{pk} = v.id",
            [ids, [deltas[team_id] for team_id in ids]],
        )


def seat_take_first(*, teams: Iterable[Team], attempt: Callable[[Team], T]) -> tuple[Team, T] | None:
    """The one rule every path that seats a lease follows (redemption, waiting list, transfer
    start, a new target): candidates were chosen by their counters without locks, best first;
    ``attempt(team)`` seats the lease there through the transition function, which re-checks the
    counter on the locked team row and raises ``TeamFullError`` (having written nothing) when the
    seat went meanwhile — then the next candidate is tried. None when none had room."""
    for team in teams:
        try:
            return team, attempt(team)
        except TeamFullError:
            continue
    return None


def teams_seats_recount(*, team_ids: Iterable[int] | None = None) -> dict[str, tuple[int, int]]:
    """Set each team's ``seats_taken`` to a recount of its leases, under the team row's lock (a
    transition that moved the counter holds that lock until it commits, so the recount is exact).
    Returns the teams that had drifted: name -> (counter, recount). For bulk writers that bypass
    the transition function (the legacy import, test set-ups, benchmarks' seeding) and the
    consistency check."""
    drift: dict[str, tuple[int, int]] = {}
    with transaction.atomic(savepoint=False):  # inside a caller's transaction: part of it
        teams = Team.objects.order_by("pk").select_for_update()
        if team_ids is not None:
            teams = teams.filter(pk__in=list(team_ids))
        locked = list(teams.values_list("pk", "name", "seats_taken"))
        recount = teams_seat_recount(team_ids=[pk for pk, _name, _taken in locked])
        for pk, name, taken in locked:
            actual = recount.get(pk, 0)
            if actual != taken:
                drift[name] = (taken, actual)
                Team.objects.filter(pk=pk).update(seats_taken=actual)
    return drift


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
    # Inside a caller's transaction, part of it (no savepoint round trips): nothing in here is
    # caught and carried on from — a refusal is reported in the result, after the block.
    with transaction.atomic(savepoint=False):
        locked = list(MemberLease.objects.filter(pk__in=ids).order_by("pk").select_for_update(of=("self",)))
        found = {lease.pk for lease in locked}
        result.missing = [pk for pk in ids if pk not in found]
        candidates: list[tuple[MemberLease, str, str, dict[str, Any]]] = []
        seat_moves: dict[int, tuple[Counter[int], Counter[int]]] = {}
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
            seats_before = seat_counts_of(lease.status, lease.team_id, lease.transfer_team_id)
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
            # By attname: reading a foreign key through its descriptor would load the team.
            snapshot = {(f := MemberLease._meta.get_field(name)).attname: getattr(lease, f.attname) for name in values}
            for name, value in values.items():
                setattr(lease, name, value)
            seats_after = seat_counts_of(new_status, lease.team_id, lease.transfer_team_id)
            if seats_after != seats_before:
                seat_moves[lease.pk] = (seats_before, seats_after)
            candidates.append((lease, from_status, new_status, snapshot))
        full = _seats_apply(seat_moves, now) if seat_moves else {}
        to_save: list[MemberLease] = []
        events: list[dict[str, Any]] = []
        # A step that changes no field writes only its event (the row stays locked till commit).
        fields_written: set[str] = {"status"} if target is not None else set()
        for lease, from_status, new_status, snapshot in candidates:
            if lease.pk in full:
                for name, value in snapshot.items():
                    setattr(lease, name, value)
                result.full.append(TeamFullError(lease.pk, full[lease.pk]))
                continue
            for name in snapshot:
                fields_written.add(MemberLease._meta.get_field(name).attname)
            lease.status = new_status
            to_save.append(lease)
            events.append(
                {
                    "lease_id": lease.pk,
                    "action": action,
                    "from_status": from_status,
                    "to_status": new_status,
                    "actor_id": actor_id,
                    "created_at": now,
                    "detail": _resolve(detail, lease),
                }
            )
            result.changed.append(lease)
        if to_save:
            if fields_written:
                _write_fields(to_save, sorted(fields_written))
            _insert_events(events)
    return result


def _single(result: TransitionResult, lease_id: int) -> MemberLease | None:
    if result.missing:
        raise MemberLease.DoesNotExist(f"lease {lease_id} does not exist")
    if result.stale:
        raise result.stale[0]
    if result.refused:
        raise result.refused[0]
    if result.full:
        raise result.full[0]
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


def lease_open(*, team: Team | None, event: dict[str, Any], now: datetime, **fields: Any) -> MemberLease:
    """Create a new lease (a redemption): ``pending`` in ``team``, taking its seat under the same
    rule as a transition (``TeamFullError`` before anything is written when the seat went), or —
    ``team`` None — ``waiting``. Its first event opens the history (there is no "from"). Call it
    inside the caller's transaction."""
    status = LeaseStatus.PENDING if team is not None else LeaseStatus.WAITING
    # No savepoint inside the caller's transaction; a refused take raises only after the block,
    # so the caller's transaction stays usable for the next candidate.
    with transaction.atomic(savepoint=False):
        taken = team is None or _seat_take(team.pk, now)
        if taken:
            lease = MemberLease.objects.create(team=team, status=status, created_at=now, **fields)
            LeaseEvent.objects.create(lease=lease, to_status=status, created_at=now, **event)
    if not taken:
        raise TeamFullError(None, team.pk)
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
