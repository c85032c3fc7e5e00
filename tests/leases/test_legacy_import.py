"""Importing the old system's SQLite file: exact mapping, skip reasons, idempotence, all or nothing."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError
from django.utils import translation

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, Team
from leases.services import legacy
from leases.services.legacy import AWAITING_TRANSFER_ERROR, legacy_db_import
from leases.services.transitions import LeaseError

pytestmark = pytest.mark.django_db
SHANGHAI = ZoneInfo("Asia/Shanghai")

LEGACY_COLUMNS = ("id", "email", "team_name", "status", "start_at", "join_at", "expires_at", "months")
LEGACY_ROWS = [
    (1, "Alice@Example.com", "Alpha", "awaiting_join", "2026-01-10 09:00:00", None, None, 1),
    (2, "bob@example.com", "Alpha", "active", "2026-01-30 20:00:00", "2026-01-31 10:00:00", None, 1),
    (3, "carol@example.com", "Alpha", "awaiting_transfer", "2025-12-01T08:00:00", "2025-12-02 08:00:00", "", 1),
    (4, "dan@example.com", "Ghost", "active", "2026-01-01 00:00:00", "2026-01-02 00:00:00", None, 1),
    (5, "not-an-email", "Alpha", "awaiting_join", "2026-01-01 00:00:00", None, None, 1),
    (6, "erin@example.com", "Alpha", "frozen", "2026-01-01 00:00:00", None, None, 1),
    (7, "frank@example.com", "Alpha", "active", "2026-01-01 00:00:00", None, None, 1),
    (8, "ALICE@example.com", "Alpha", "awaiting_join", "2026-01-11 09:00:00", None, None, 1),
    (
        9,
        "gina@example.com",
        "Beta",
        "active",
        "2026-01-05T10:00:00+00:00",
        "2026-01-06T10:00:00Z",
        "2026-04-06T10:00:00Z",
        3,
    ),
    (10, "hank@example.com", "Beta", "active", "2026-01-05 10:00:00", "2026-02-06 10:00:00", "2026-02-01 10:00:00", 1),
    (11, "ivy@example.com", "Beta", "awaiting_join", None, None, None, 1),
    (12, "judy@example.com", "Beta", "awaiting_join", "2026-01-07 10:00:00", None, None, 1),
]
IMPORTED_IDS = {"1", "2", "3", "9"}
SKIPPED = {
    "4": "unknown team 'Ghost'",
    "5": "invalid email 'not-an-email'",
    "6": "unknown status 'frozen'",
    "7": "active without join_at",
    "8": "alice@example.com already gets an open lease from row 1",
    "10": "is not after join_at",
    "11": "no start_at",
    "12": "judy@example.com already has an open lease (lease",
}


def write_legacy_db(
    path: Path,
    rows: list[tuple] = LEGACY_ROWS,
    columns: tuple[str, ...] = LEGACY_COLUMNS,
    teams: list[tuple[int, str]] | None = None,
) -> Path:
    """Write a SQLite file shaped like the old system's (``member_leases``, optionally ``teams``)."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(f"CREATE TABLE member_leases ({', '.join(columns)})")
        connection.executemany(
            f"INSERT INTO member_leases VALUES ({', '.join('?' for _ in columns)})",
            rows,
        )
        if teams is not None:
            connection.execute("CREATE TABLE teams (id INTEGER PRIMARY KEY, name TEXT)")
            connection.executemany("INSERT INTO teams VALUES (?, ?)", teams)
    connection.close()
    return path


def make_team(name: str, capacity: int = 10) -> Team:
    return Team.objects.create(name=name, provider="memory", api_base="", capacity=capacity)


@pytest.fixture(autouse=True)
def _shanghai(settings) -> None:
    settings.TIME_ZONE = "Asia/Shanghai"  # naive legacy timestamps are local time in TIME_ZONE


@pytest.fixture
def teams() -> dict[str, Team]:
    alpha, beta = make_team("Alpha"), make_team("Beta")
    # judy already holds an open lease in Beta (redeemed in the new system).
    MemberLease.objects.create(email="judy@example.com", team=beta, term_months=1, status=LeaseStatus.PENDING)
    return {"Alpha": alpha, "Beta": beta}


@pytest.fixture
def legacy_db(tmp_path: Path) -> Path:
    return write_legacy_db(tmp_path / "old.sqlite3")


def imported() -> dict[str, MemberLease]:
    return {lease.legacy_id: lease for lease in MemberLease.objects.filter(legacy_id__isnull=False)}


def test_statuses_and_timestamps_are_mapped_exactly(teams, legacy_db):
    report = legacy_db_import(path=legacy_db)

    assert report.imported == 4 and report.already_imported == 0
    leases = imported()
    assert set(leases) == IMPORTED_IDS

    pending = leases["1"]
    assert (pending.email, pending.team, pending.status) == ("alice@example.com", teams["Alpha"], LeaseStatus.PENDING)
    assert pending.created_at == pending.invited_at == datetime(2026, 1, 10, 9, 0, tzinfo=SHANGHAI)
    assert pending.joined_at is None and pending.expires_at is None
    assert pending.term_months == 1 and pending.total_months is None and pending.last_error == ""

    active = leases["2"]
    assert active.status == LeaseStatus.ACTIVE
    # created_at is the redemption time, never the join time.
    assert active.created_at == active.invited_at == datetime(2026, 1, 30, 20, 0, tzinfo=SHANGHAI)
    assert active.joined_at == datetime(2026, 1, 31, 10, 0, tzinfo=SHANGHAI)
    # No legacy expires_at: join + 1 month, clamped to the end of February in Shanghai.
    assert active.expires_at == datetime(2026, 2, 28, 10, 0, tzinfo=SHANGHAI)

    failed = leases["3"]
    assert failed.status == LeaseStatus.FAILED
    assert failed.last_error == AWAITING_TRANSFER_ERROR
    assert failed.created_at == datetime(2025, 12, 1, 8, 0, tzinfo=SHANGHAI)
    assert failed.joined_at == datetime(2025, 12, 2, 8, 0, tzinfo=SHANGHAI)
    assert failed.expires_at == datetime(2026, 1, 2, 8, 0, tzinfo=SHANGHAI)  # '' is no expiry: join + term

    with_offsets = leases["9"]
    assert with_offsets.status == LeaseStatus.ACTIVE and with_offsets.team == teams["Beta"]
    assert with_offsets.created_at == datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assert with_offsets.joined_at == datetime(2026, 1, 6, 10, 0, tzinfo=UTC)
    assert with_offsets.expires_at == datetime(2026, 4, 6, 10, 0, tzinfo=UTC)  # the legacy expiry wins
    assert with_offsets.term_months == 3


def test_each_imported_lease_gets_one_imported_event(teams, legacy_db):
    legacy_db_import(path=legacy_db)

    events = LeaseEvent.objects.filter(lease__legacy_id__isnull=False)
    assert events.count() == 4
    assert set(events.values_list("action", flat=True)) == {LeaseAction.IMPORTED}
    active = imported()["2"]
    event = active.events.get()
    assert (event.from_status, event.to_status) == ("", LeaseStatus.ACTIVE)
    assert event.detail == {
        "legacy_id": "2",
        "legacy_status": "active",
        "team": "Alpha",
        "term_months": 1,
        "start_at": "2026-01-30 20:00:00",
        "join_at": "2026-01-31 10:00:00",
        "expires_at": None,
        "source": "old.sqlite3",
    }
    assert imported()["3"].events.get().to_status == LeaseStatus.FAILED


def test_skipped_rows_are_reported_with_their_reason(teams, legacy_db):
    report = legacy_db_import(path=legacy_db)

    reasons = dict(report.skipped)
    assert set(reasons) == set(SKIPPED)
    for legacy_id, expected in SKIPPED.items():
        assert expected in reasons[legacy_id], (legacy_id, reasons[legacy_id])
    assert not MemberLease.objects.filter(legacy_id__in=SKIPPED).exists()
    # judy's lease from the new system is untouched, and still the only one.
    assert MemberLease.objects.filter(email="judy@example.com").get().legacy_id is None


def test_a_second_run_imports_nothing_new(teams, legacy_db):
    first = legacy_db_import(path=legacy_db)
    snapshot = {lease.legacy_id: (lease.pk, lease.status, lease.expires_at) for lease in imported().values()}

    second = legacy_db_import(path=legacy_db)

    assert (second.imported, second.already_imported) == (0, first.imported)
    assert dict(second.skipped).keys() == dict(first.skipped).keys()
    assert {lease.legacy_id: (lease.pk, lease.status, lease.expires_at) for lease in imported().values()} == snapshot
    assert LeaseEvent.objects.filter(action=LeaseAction.IMPORTED).count() == first.imported


def test_a_dry_run_writes_nothing_and_reports_the_same(teams, legacy_db):
    leases_before, events_before = MemberLease.objects.count(), LeaseEvent.objects.count()

    dry = legacy_db_import(path=legacy_db, dry_run=True)

    assert (MemberLease.objects.count(), LeaseEvent.objects.count()) == (leases_before, events_before)
    real = legacy_db_import(path=legacy_db)
    assert (dry.imported, dry.already_imported, dry.skipped) == (real.imported, real.already_imported, real.skipped)
    assert dry.dry_run and "dry run" in dry.as_text()


def test_the_old_file_is_opened_read_only(teams, legacy_db):
    before = hashlib.sha256(legacy_db.read_bytes()).hexdigest()
    legacy_db_import(path=legacy_db)
    assert hashlib.sha256(legacy_db.read_bytes()).hexdigest() == before


def test_a_failed_write_rolls_back_the_whole_run(teams, legacy_db, monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise IntegrityError("simulated")

    monkeypatch.setattr(LeaseEvent.objects, "bulk_create", refuse)
    with translation.override("en"), pytest.raises(LeaseError, match="rolled back, nothing was written"):
        legacy_db_import(path=legacy_db)
    assert not MemberLease.objects.filter(legacy_id__isnull=False).exists()


def test_queries_do_not_grow_with_the_rows(teams, tmp_path, django_assert_max_num_queries, monkeypatch):
    monkeypatch.setattr(legacy, "CHUNK_SIZE", 50)
    rows = [
        (n, f"user{n}@example.com", "Alpha", "active", "2026-01-01 10:00:00", "2026-01-02 10:00:00", None, 1)
        for n in range(1, 41)
    ]
    small = write_legacy_db(tmp_path / "small.sqlite3", rows[:3])
    large = write_legacy_db(tmp_path / "large.sqlite3", rows[3:])

    # teams, legacy ids, open leases, leases insert, events insert, capacity, plus savepoint bookkeeping,
    # plus the seat recount of the teams written to (lock, two grouped counts, one update per team).
    with django_assert_max_num_queries(14) as small_run:
        assert legacy_db_import(path=small).imported == 3
    with django_assert_max_num_queries(len(small_run.captured_queries)):
        assert legacy_db_import(path=large).imported == 37


def test_rows_are_read_in_chunks_and_duplicates_across_chunks_are_caught(teams, tmp_path, monkeypatch):
    monkeypatch.setattr(legacy, "CHUNK_SIZE", 2)
    rows = [
        (n, f"user{n}@example.com", "Alpha", "awaiting_join", "2026-01-01 10:00:00", None, None, 1) for n in range(1, 6)
    ]
    rows.append((6, "USER1@example.com", "Alpha", "awaiting_join", "2026-01-02 10:00:00", None, None, 1))
    rows.append((3, "other@example.com", "Alpha", "awaiting_join", "2026-01-02 10:00:00", None, None, 1))
    path = write_legacy_db(tmp_path / "chunks.sqlite3", rows)

    report = legacy_db_import(path=path)

    assert report.imported == 5
    reasons = dict(report.skipped)
    assert "from row 1" in reasons["6"]
    assert len(report.skipped) == 2 and "duplicate legacy id" in report.skipped[0][1]


def test_team_id_with_teams_table_and_epoch_timestamps(tmp_path):
    gamma = make_team("Gamma", capacity=1)
    columns = ("email", "team_id", "status", "start_at", "join_at", "expires_at")
    start, join = 1767225600, 1767312000  # 2026-01-01T00:00:00Z, 2026-01-02T00:00:00Z
    expires = 1775088000  # 2026-04-02T00:00:00Z: three whole months after join
    rows = [
        ("kim@example.com", 7, "active", start, join, expires),
        ("lee@example.com", 7, "awaiting_join", float(start), None, None),
        ("max@example.com", 7, "awaiting_join", str(start), None, None),
        ("ned@example.com", 8, "awaiting_join", start, None, None),
        ("oz@example.com", 99, "awaiting_join", start, None, None),
    ]
    path = write_legacy_db(tmp_path / "variant.sqlite3", rows, columns, teams=[(7, "Gamma"), (8, "Delta")])

    report = legacy_db_import(path=path)

    assert report.imported == 3
    assert [reason for _id, reason in report.skipped] == [
        "unknown team 'Delta' (create it first)",
        "unknown legacy team id '99' (not in the old teams table)",
    ]
    kim = MemberLease.objects.get(email="kim@example.com")
    assert kim.team == gamma and kim.status == LeaseStatus.ACTIVE
    assert kim.created_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert kim.joined_at == datetime(2026, 1, 2, tzinfo=UTC)
    assert kim.expires_at == datetime(2026, 4, 2, tzinfo=UTC)
    assert kim.term_months == 3  # no term column: whole months from join to expiry
    for email in ("lee@example.com", "max@example.com"):  # float and text epochs
        lease = MemberLease.objects.get(email=email)
        assert lease.created_at == datetime(2026, 1, 1, tzinfo=UTC) and lease.term_months == 1
    # No id column: a stable hash id, so a second run recognises the rows.
    assert kim.legacy_id.startswith("sha256:") and len(kim.legacy_id) <= 64
    assert report.warnings == ["team Gamma now has 3 open lease(s) for 1 seat(s)"]
    again = legacy_db_import(path=path)
    assert (again.imported, again.already_imported, len(again.skipped)) == (0, 3, 2)


def test_without_term_or_expiry_the_term_is_one_month(tmp_path):
    make_team("Alpha")
    columns = ("id", "email", "team", "status", "start_at", "join_at")
    rows = [("a-1", "olga@example.com", "Alpha", "active", "2026-03-31T09:00:00+08:00", "2026-03-31T10:00:00+08:00")]
    legacy_db_import(path=write_legacy_db(tmp_path / "noterm.sqlite3", rows, columns))
    lease = MemberLease.objects.get(legacy_id="a-1")
    assert lease.term_months == 1
    assert lease.expires_at == datetime(2026, 4, 30, 10, 0, tzinfo=SHANGHAI)


def test_unreadable_values_skip_the_row(tmp_path):
    make_team("Alpha")
    rows = [
        (1, "pia@example.com", "Alpha", "awaiting_join", "yesterday", None, None, 1),
        (2, "quinn@example.com", "Alpha", "active", "2026-01-01", "2026-01-02", None, 0),
    ]
    report = legacy_db_import(path=write_legacy_db(tmp_path / "bad.sqlite3", rows))
    assert report.imported == 0
    assert dict(report.skipped) == {
        "1": "unreadable start_at 'yesterday'",
        "2": "invalid term 0 (whole months, at least 1)",
    }


def test_command_prints_the_summary_and_each_skipped_row(teams, legacy_db):
    out = io.StringIO()
    call_command("import_legacy_db", str(legacy_db), stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "imported 4, already imported 0, skipped 8"
    assert "skipped 4: unknown team 'Ghost' (create it first)" in lines
    assert "skipped 7: active without join_at" in lines
    assert len([line for line in lines if line.startswith("skipped ")]) == 8

    again = io.StringIO()
    call_command("import_legacy_db", str(legacy_db), stdout=again)
    assert again.getvalue().splitlines()[0] == "imported 0, already imported 4, skipped 8"


def test_command_dry_run(teams, legacy_db):
    out = io.StringIO()
    call_command("import_legacy_db", str(legacy_db), "--dry-run", stdout=out)
    assert out.getvalue().startswith("imported 4, already imported 0, skipped 8 (dry run: nothing was written)")
    assert not MemberLease.objects.filter(legacy_id__isnull=False).exists()


def test_command_refuses_a_missing_file(tmp_path):
    missing = tmp_path / "nope.sqlite3"
    with translation.override("en"), pytest.raises(CommandError, match="does not exist"):
        call_command("import_legacy_db", str(missing))
    assert not missing.exists()  # read-only: opening never creates the file


def test_command_refuses_a_file_without_the_table(tmp_path):
    path = tmp_path / "other.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE something_else (x)")
    connection.commit()
    connection.close()
    with translation.override("en"), pytest.raises(CommandError) as excinfo:
        call_command("import_legacy_db", str(path))
    assert str(excinfo.value) == (
        f"The legacy database {path} has no member_leases table (tables found: something_else)."
    )


def test_command_refuses_a_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not the leases you are looking for\n" * 50)
    with translation.override("en"), pytest.raises(CommandError, match="is not a readable SQLite database"):
        call_command("import_legacy_db", str(path))


def test_a_table_without_a_required_column_is_refused(tmp_path):
    path = write_legacy_db(tmp_path / "noteam.sqlite3", [], ("id", "email", "status", "start_at"))
    with translation.override("en"), pytest.raises(LeaseError, match=r"no team column \(looked for: team_name"):
        legacy_db_import(path=path)
