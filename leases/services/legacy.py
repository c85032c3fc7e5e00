"""Import the old system's leases from its SQLite file (table ``member_leases``), once per row.

The old schema is only partly known, so columns are looked up under a few names (see
``_COLUMN_NAMES``). Each row's ``legacy_id`` (the ``id`` column, or a hash of the row) makes a
second run import nothing new. A run is all or nothing, and costs a constant number of queries per
chunk of rows however large the old table is. Creation is not a transition: the status is set
directly and recorded by one ``imported`` event per lease.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import DataError, IntegrityError, transaction
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext as _

from leases import events
from leases.models import NON_FINAL_STATUSES, LeaseEvent, LeaseStatus, MemberLease, Team
from leases.selectors import teams_with_seat_usage
from leases.services.transitions import LeaseError
from leases.timeutils import add_months

LEGACY_TABLE = "member_leases"
LEGACY_TEAMS_TABLE = "teams"
CHUNK_SIZE = 500  # rows per batch of queries; keeps IN lists well under SQLite's parameter limit

STATUS_MAP: dict[str, str] = {
    "awaiting_join": LeaseStatus.PENDING,
    "active": LeaseStatus.ACTIVE,
    "awaiting_transfer": LeaseStatus.FAILED,
}
AWAITING_TRANSFER_ERROR = "imported: was awaiting transfer in the old system"

# Logical column -> names it may have in the old table, first match wins.
_COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "email": ("email",),
    "team": ("team_name", "team", "team_id"),
    "status": ("status",),
    "start_at": ("start_at",),
    "join_at": ("join_at",),
    "expires_at": ("expires_at",),
    "term": ("term_months", "months", "duration_months"),
}
_REQUIRED = ("email", "team", "status", "start_at")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_MAX_TERM = 32767  # PositiveSmallIntegerField
_MAX_LEGACY_ID = MemberLease._meta.get_field("legacy_id").max_length
_MAX_EMAIL = MemberLease._meta.get_field("email").max_length


@dataclass
class LegacyImportReport:
    """What a run did (or, with ``dry_run``, would do); ``skipped`` is (legacy id, reason)."""

    imported: int = 0
    already_imported: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_text(self) -> str:
        head = f"imported {self.imported}, already imported {self.already_imported}, skipped {len(self.skipped)}"
        if self.dry_run:
            head += " (dry run: nothing was written)"
        lines = [head]
        lines += [f"skipped {legacy_id}: {reason}" for legacy_id, reason in self.skipped]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Schema:
    columns: dict[str, str]  # logical name -> actual column name (absent ones missing)
    team_names: dict[str, str] | None  # legacy team id -> name, when ``team_id`` resolves via ``teams``


@dataclass
class _Candidate:
    legacy_id: str
    lease: MemberLease
    detail: dict[str, Any]


class _Skip(Exception):  # noqa: N818 - control flow inside this module, not an error
    pass


def legacy_db_import(*, path: str | Path, dry_run: bool = False) -> LegacyImportReport:
    """Import every ``member_leases`` row not imported yet; all or nothing. ``dry_run`` writes nothing.

    Raises ``LeaseError`` when the file cannot be read as the old database, or when the database
    refuses the write (nothing is written then).
    """
    path = Path(path)
    report = LegacyImportReport(dry_run=dry_run)
    connection = _open(path)
    try:
        schema = _schema(connection, path)
        teams = {team.name: team for team in Team.objects.only("pk", "name")}
        seen_ids: set[str] = set()
        open_in_file: dict[str, str] = {}  # email -> legacy id opening its lease
        planned_per_team: Counter[int] = Counter()
        now = timezone.now()
        try:
            with transaction.atomic():
                for rows in _chunks(connection, schema, path):
                    candidates = _chunk_candidates(rows, schema, teams, seen_ids, open_in_file, report)
                    for candidate in candidates:
                        planned_per_team[candidate.lease.team_id] += 1
                    report.imported += len(candidates)
                    if not dry_run and candidates:
                        _write(candidates, now=now, source=path.name)
                report.warnings = _capacity_warnings(planned_per_team, already_written=not dry_run)
        except (IntegrityError, DataError) as exc:
            raise LeaseError(_("The import was rolled back, nothing was written: %(error)s") % {"error": exc}) from exc
    finally:
        connection.close()
    return report


def _open(path: Path) -> sqlite3.Connection:
    """Read-only, so an import can never change the old system's file."""
    if not path.exists():
        raise LeaseError(_("The legacy database %(path)s does not exist.") % {"path": path})
    if not path.is_file():
        raise LeaseError(_("The legacy database %(path)s is not a file.") % {"path": path})
    try:
        connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LeaseError(
            _("Cannot open the legacy database %(path)s: %(error)s") % {"path": path, "error": exc}
        ) from exc
    # The old system may have stored text that is not UTF-8: read it rather than fail the run.
    connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
    return connection


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_columns(connection: sqlite3.Connection, table: str) -> dict[str, str]:
    """Lower-cased name -> actual name (SQLite column names are case-insensitive)."""
    return {row[1].lower(): row[1] for row in connection.execute(f"PRAGMA table_info({_quote(table)})")}


def _schema(connection: sqlite3.Connection, path: Path) -> _Schema:
    try:
        tables = {
            row[0].lower(): row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        }
    except sqlite3.DatabaseError as exc:
        raise LeaseError(
            _("%(path)s is not a readable SQLite database (%(error)s).") % {"path": path, "error": exc}
        ) from exc
    if LEGACY_TABLE not in tables:
        raise LeaseError(
            _("The legacy database %(path)s has no %(table)s table (tables found: %(found)s).")
            % {"path": path, "table": LEGACY_TABLE, "found": ", ".join(sorted(tables.values())) or "-"}
        )
    found = _table_columns(connection, tables[LEGACY_TABLE])
    columns: dict[str, str] = {}
    for logical, names in _COLUMN_NAMES.items():
        for name in names:
            if name in found:
                columns[logical] = found[name]
                break
        else:
            if logical in _REQUIRED:
                raise LeaseError(
                    _("The %(table)s table has no %(what)s column (looked for: %(names)s; found: %(found)s).")
                    % {
                        "table": LEGACY_TABLE,
                        "what": logical,
                        "names": ", ".join(names),
                        "found": ", ".join(sorted(found.values())),
                    }
                )
    team_names = None
    if columns["team"].lower() == "team_id" and LEGACY_TEAMS_TABLE in tables:
        team_columns = _table_columns(connection, tables[LEGACY_TEAMS_TABLE])
        if "id" in team_columns and "name" in team_columns:
            # Identifiers come from the file's own catalogue and are quoted; there are no values.
            select = f"SELECT {_quote(team_columns['id'])}, {_quote(team_columns['name'])} FROM "  # noqa: S608
            rows = connection.execute(select + _quote(tables[LEGACY_TEAMS_TABLE]))
            team_names = {_key(team_id): str(name).strip() for team_id, name in rows if team_id is not None}
    return _Schema(columns=columns, team_names=team_names)


def _chunks(connection: sqlite3.Connection, schema: _Schema, path: Path) -> Iterator[list[dict[str, Any]]]:
    logical = list(schema.columns)
    select = ", ".join(_quote(schema.columns[name]) for name in logical)
    order = f" ORDER BY {_quote(schema.columns['id'])}" if "id" in schema.columns else ""
    try:
        cursor = connection.execute(f"SELECT {select} FROM {_quote(LEGACY_TABLE)}{order}")  # noqa: S608
        while rows := cursor.fetchmany(CHUNK_SIZE):
            yield [dict(zip(logical, row, strict=True)) for row in rows]
    except sqlite3.DatabaseError as exc:
        raise LeaseError(
            _("Cannot read the %(table)s table of %(path)s: %(error)s")
            % {"table": LEGACY_TABLE, "path": path, "error": exc}
        ) from exc


def _key(value: object) -> str:
    """A legacy id as text: 12, 12.0 and ' 12 ' are the same id."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()


def _text(value: object) -> str:
    return "" if value is None else _key(value)


def _raw(value: object) -> object:
    """A raw value fit for the event's JSON detail."""
    if value is None or isinstance(value, int | float | str):
        return value
    return _key(value)


def _legacy_id(row: dict[str, Any]) -> str:
    """The ``id`` column, else a hash of the row's raw email, team and start_at (same row, same id)."""
    if row.get("id") is not None and _key(row["id"]):
        return _key(row["id"])
    material = json.dumps([_text(row["email"]).lower(), _text(row["team"]), _text(row["start_at"])], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:57]


def _moment(value: object, column: str) -> datetime | None:
    """ISO text (naive = local time in TIME_ZONE), 'YYYY-MM-DD HH:MM:SS' or epoch seconds; blank = None."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, tz=UTC)
        text = _key(value)
        if not text:
            return None
        if _NUMBER.fullmatch(text):
            return datetime.fromtimestamp(float(text), tz=UTC)
        moment = datetime.fromisoformat(text)
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment, timezone.get_default_timezone())
        return moment
    except (ValueError, OverflowError, OSError):
        raise _Skip(f"unreadable {column} {_raw(value)!r}") from None


def _whole_months(start: datetime, end: datetime) -> int:
    local_start, local_end = timezone.localtime(start), timezone.localtime(end)
    months = (local_end.year - local_start.year) * 12 + local_end.month - local_start.month
    while months > 0 and add_months(start, months) > end:
        months -= 1
    return months


def _term(row: dict[str, Any], join_at: datetime | None, expires_at: datetime | None) -> int:
    """The term column; if absent or blank, whole months from join_at to expires_at; else 1."""
    value = row.get("term")
    if value is None or (isinstance(value, str) and not value.strip()):
        if join_at is not None and expires_at is not None and expires_at > join_at:
            return max(_whole_months(join_at, expires_at), 1)
        return 1
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or not 1 <= number <= _MAX_TERM:
        raise _Skip(f"invalid term {_raw(value)!r} (whole months, at least 1)")
    return int(number)


def _candidate(row: dict[str, Any], legacy_id: str, schema: _Schema, teams: dict[str, Team]) -> _Candidate:
    """Validate one row and build its lease (unsaved); raises ``_Skip`` with the reason."""
    if len(legacy_id) > _MAX_LEGACY_ID:
        raise _Skip(f"legacy id longer than {_MAX_LEGACY_ID} characters")
    legacy_status = _text(row["status"]).lower()
    status = STATUS_MAP.get(legacy_status)
    if status is None:
        raise _Skip(f"unknown status {_raw(row['status'])!r}")

    email = _text(row["email"]).lower()
    try:
        validate_email(email)
    except ValidationError:
        raise _Skip(f"invalid email {_raw(row['email'])!r}") from None
    if len(email) > _MAX_EMAIL:
        raise _Skip(f"email longer than {_MAX_EMAIL} characters")

    team_value = _text(row["team"])
    if schema.team_names is not None:
        if team_value not in schema.team_names:
            raise _Skip(f"unknown legacy team id {team_value!r} (not in the old {LEGACY_TEAMS_TABLE} table)")
        team_value = schema.team_names[team_value]
    team = teams.get(team_value)
    if team is None:
        raise _Skip(f"unknown team {team_value!r} (create it first)")

    start_at = _moment(row["start_at"], "start_at")
    if start_at is None:
        raise _Skip("no start_at")
    join_at = _moment(row.get("join_at"), "join_at")
    legacy_expires_at = _moment(row.get("expires_at"), "expires_at")
    term = _term(row, join_at, legacy_expires_at)

    joined_at = expires_at = None
    if status == LeaseStatus.ACTIVE and join_at is None:
        raise _Skip("active without join_at")
    if join_at is not None and join_at < start_at:
        # A seat is joined after it was redeemed; the other order is a corrupt row, and taking
        # it would start the term before the customer paid.
        raise _Skip(f"join_at ({join_at.isoformat()}) is before start_at ({start_at.isoformat()})")
    if status != LeaseStatus.PENDING and join_at is not None:
        # A failed lease without join_at keeps no expiry either (an expiry needs a join time).
        joined_at = join_at
        try:
            expires_at = legacy_expires_at or add_months(join_at, term)
        except (ValueError, OverflowError):
            raise _Skip(f"cannot add {term} month(s) to join_at") from None
        if expires_at <= joined_at:
            raise _Skip(f"expires_at ({expires_at.isoformat()}) is not after join_at ({joined_at.isoformat()})")

    lease = MemberLease(
        email=email,
        team=team,
        term_months=term,
        status=status,
        created_at=start_at,
        invited_at=start_at,
        joined_at=joined_at,
        expires_at=expires_at,
        last_error=AWAITING_TRANSFER_ERROR if status == LeaseStatus.FAILED else "",
        legacy_id=legacy_id,
    )
    detail = {
        "legacy_id": legacy_id,
        "legacy_status": legacy_status,
        "team": team.name,
        "term_months": term,
        "start_at": _raw(row["start_at"]),
        "join_at": _raw(row.get("join_at")),
        "expires_at": _raw(row.get("expires_at")),
    }
    return _Candidate(legacy_id=legacy_id, lease=lease, detail=detail)


def _chunk_candidates(
    rows: list[dict[str, Any]],
    schema: _Schema,
    teams: dict[str, Team],
    seen_ids: set[str],
    open_in_file: dict[str, str],
    report: LegacyImportReport,
) -> list[_Candidate]:
    """The chunk's rows to create, in two queries; skipped and already-imported rows go to ``report``."""
    keyed: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        legacy_id = _legacy_id(row)
        if legacy_id in seen_ids:
            report.skipped.append((legacy_id, "duplicate legacy id in the file (the first row with it counts)"))
            continue
        seen_ids.add(legacy_id)
        keyed.append((legacy_id, row))
    existing = set(
        MemberLease.objects.filter(legacy_id__in=[legacy_id for legacy_id, _row in keyed]).values_list(
            "legacy_id", flat=True
        )
    )
    candidates: list[_Candidate] = []
    for legacy_id, row in keyed:
        if legacy_id in existing:
            report.already_imported += 1
            continue
        try:
            candidates.append(_candidate(row, legacy_id, schema, teams))
        except _Skip as skip:
            report.skipped.append((legacy_id, str(skip)))
    if not candidates:
        return []

    # One open lease per email, whatever the team (the database enforces it too).
    open_in_db = {
        email: (pk, status, team_name)
        for email, pk, status, team_name in MemberLease.objects.annotate(email_lower=Lower("email"))
        .filter(status__in=NON_FINAL_STATUSES, email_lower__in={c.lease.email for c in candidates})
        .values_list("email_lower", "pk", "status", "team__name")
    }
    accepted: list[_Candidate] = []
    for candidate in candidates:
        lease = candidate.lease
        key = lease.email
        # The file first: a dry run (which writes nothing) then gives the same reasons as a real run.
        if key in open_in_file:
            reason = f"{lease.email} already gets an open lease from row {open_in_file[key]}"
        elif key in open_in_db:
            pk, status, team_name = open_in_db[key]
            reason = f"{lease.email} already has an open lease (lease {pk}, {status}, team {team_name})"
        else:
            open_in_file[key] = candidate.legacy_id
            accepted.append(candidate)
            continue
        report.skipped.append((candidate.legacy_id, reason))
    return accepted


def _write(candidates: list[_Candidate], *, now: datetime, source: str) -> None:
    leases = MemberLease.objects.bulk_create([c.lease for c in candidates], batch_size=CHUNK_SIZE)
    LeaseEvent.objects.bulk_create(
        [
            LeaseEvent(
                lease=lease,
                from_status="",
                to_status=lease.status,
                created_at=now,
                **events.imported(source=source, **candidate.detail),
            )
            for lease, candidate in zip(leases, candidates, strict=True)
        ],
        batch_size=CHUNK_SIZE,
    )
    # Imported leases are created in bulk, not through the transition function: their teams' seat
    # counters are recounted (under the team rows' locks) in the same transaction.
    from leases.services.transitions import teams_seats_recount

    teams_seats_recount(team_ids={lease.team_id for lease in leases if lease.team_id is not None})


def _capacity_warnings(planned_per_team: Counter[int], *, already_written: bool) -> list[str]:
    """Imported seats are not refused for capacity (the members are seated already); say so instead."""
    if not planned_per_team:
        return []
    warnings = []
    for team in teams_with_seat_usage(Team.objects.filter(pk__in=planned_per_team).only("pk", "name", "capacity")):
        held = team.leases_held + team.leases_incoming + (0 if already_written else planned_per_team[team.pk])
        if held > team.capacity:
            warnings.append(f"team {team.name} now has {held} open lease(s) for {team.capacity} seat(s)")
    return warnings
