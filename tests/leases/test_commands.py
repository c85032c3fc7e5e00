"""The operators' management commands, run through ``call_command`` against the real local fake
provider (``make_team``)."""

from __future__ import annotations

import csv
import io
import sys
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from leases.models import LeaseAction, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.providers import TransientProviderError
from leasesite.crypto import decrypt_secret

pytestmark = pytest.mark.django_db

CSV_HEADER = ["code", "term_months", "total_months", "batch", "created_at", "redeemed_at", "email", "pool"]


def run(*args: str, **options: object) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


# -- sync_joins ---------------------------------------------------------------------------------------
def test_sync_joins_reports_every_team(provider, make_team, make_lease):
    alpha, _beta = make_team("alpha"), make_team("beta")
    joined = make_lease(alpha, LeaseStatus.PENDING)
    waiting = make_lease(alpha, LeaseStatus.PENDING)
    provider.state.team("alpha").accept(joined.email)
    provider.state.team("alpha").invite(waiting.email)

    out, err = run("sync_joins")

    lines = out.splitlines()
    assert len(lines) == 2 and err == ""
    assert lines[0].startswith("alpha: 1 member(s), 1 invite(s), 2 pending lease(s): 1 joined, 0 missing")
    assert lines[1].startswith("beta: 0 member(s), 0 invite(s), 0 pending lease(s): 0 joined")
    joined.refresh_from_db()
    waiting.refresh_from_db()
    assert (joined.status, waiting.status) == (LeaseStatus.ACTIVE, LeaseStatus.PENDING)


def test_sync_joins_of_one_team_and_one_email(provider, make_team, make_lease):
    alpha, beta = make_team("alpha"), make_team("beta")
    lease = make_lease(beta, LeaseStatus.PENDING, email="only@example.com")
    other = make_lease(beta, LeaseStatus.PENDING)
    provider.state.team("beta").accept(lease.email)
    provider.state.team("beta").accept(other.email)

    out, _err = run("sync_joins", "--team", "beta", "--email", "ONLY@example.com")

    assert out.startswith("beta: ") and "alpha" not in out
    assert provider.state.calls("alpha") == 0
    lease.refresh_from_db()
    other.refresh_from_db()
    assert (lease.status, other.status) == (LeaseStatus.ACTIVE, LeaseStatus.PENDING)
    assert alpha.leases.count() == 0


def test_sync_joins_unknown_team_names_the_known_ones(make_team):
    make_team("beta")
    make_team("alpha")
    with pytest.raises(CommandError, match=r"no team named 'nosuch' \(teams: alpha, beta\)"):
        run("sync_joins", "--team", "nosuch")


def test_sync_joins_bad_email_is_an_argument_error(make_team):
    make_team("alpha")
    with pytest.raises(CommandError, match="not a valid email address"):
        run("sync_joins", "--email", "not-an-email")


def test_sync_joins_failing_team_is_reported_and_fails_the_command(provider, make_team):
    make_team("alpha")
    make_team("beta")
    provider.state.team("beta").fail_next.append(TransientProviderError("boom", status=503))
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match=r"1 team\(s\) not synced"):
        call_command("sync_joins", stdout=out, stderr=err)
    assert out.getvalue().startswith("alpha: ")
    assert err.getvalue().startswith("beta: listing failed")


# -- run_transfers ------------------------------------------------------------------------------------
@pytest.fixture
def due_lease(provider, make_team, make_lease) -> MemberLease:
    """An active lease in alpha whose term ended a minute ago; beta has free seats."""
    alpha = make_team("alpha")
    make_team("beta")
    now = timezone.now()
    lease = make_lease(
        alpha,
        LeaseStatus.ACTIVE,
        email="due@example.com",
        joined_at=now - timedelta(days=40),
        expires_at=now - timedelta(minutes=1),
    )
    member_id = provider.state.team("alpha").add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    return lease


def test_run_transfers_dry_run_changes_nothing(provider, due_lease):
    events_before = due_lease.events.count()

    out, _err = run("run_transfers", "--dry-run")

    assert "due@example.com: would_transfer alpha -> beta" in out
    assert out.splitlines()[-1] == "dry run: claimed 1, would_transfer 1"
    due_lease.refresh_from_db()
    assert (due_lease.status, due_lease.team.name, due_lease.claimed_until) == (LeaseStatus.ACTIVE, "alpha", None)
    assert due_lease.events.count() == events_before
    assert provider.state.calls() == 0
    assert provider.state.team("alpha").member_emails() == {"due@example.com"}


def test_run_transfers_moves_a_due_lease(provider, due_lease):
    out, _err = run("run_transfers")

    assert "due@example.com: transferred alpha -> beta" in out
    assert out.splitlines()[-1] == "claimed 1, transferred 1"
    due_lease.refresh_from_db()
    assert (due_lease.status, due_lease.team.name) == (LeaseStatus.PENDING, "beta")
    assert (due_lease.transfer_team_id, due_lease.joined_at, due_lease.claimed_until) == (None, None, None)
    assert provider.state.team("beta").invited_emails() == {"due@example.com"}
    assert provider.state.team("alpha").member_emails() == set()
    actions = list(due_lease.events.values_list("action", flat=True))
    assert actions[-4:] == [
        LeaseAction.TRANSFER_STARTED,
        LeaseAction.INVITED,
        LeaseAction.LEFT_OLD_TEAM,
        LeaseAction.TRANSFERRED,
    ]


def test_run_transfers_with_nothing_due_moves_nothing(provider, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE)  # expires in 10 days
    make_team("beta")
    out, _err = run("run_transfers")
    assert out.strip() == "claimed 0"
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE


# -- generate_codes -----------------------------------------------------------------------------------
def test_generate_codes_prints_csv():
    out, _err = run("generate_codes", "--count", "3", "--term-months", "1", "--batch", "b1")

    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == CSV_HEADER
    assert len(rows) == 4
    codes = {row[0] for row in rows[1:]}
    assert codes == set(RedemptionCode.objects.values_list("code", flat=True))
    assert {(row[1], row[2], row[3], row[5], row[6]) for row in rows[1:]} == {("1", "", "b1", "", "")}


def test_generate_codes_writes_a_csv_file(tmp_path):
    target = tmp_path / "codes.csv"

    out, err = run("generate_codes", "--count", "2", "--term-months", "3", "--total-months", "12", "--csv", str(target))

    assert out == ""
    assert str(target) in err and "2 code(s)" in err
    rows = list(csv.reader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert rows[0] == CSV_HEADER
    assert {row[0] for row in rows[1:]} == set(RedemptionCode.objects.values_list("code", flat=True))
    assert len(rows) == 3 and all(row[1:3] == ["3", "12"] for row in rows[1:])


def test_generate_codes_refuses_a_total_shorter_than_the_term():
    with pytest.raises(CommandError):
        run("generate_codes", "--count", "3", "--term-months", "6", "--total-months", "3")
    assert not RedemptionCode.objects.exists()


def test_generate_codes_refuses_a_zero_count():
    with pytest.raises(CommandError, match="must be at least 1"):
        run("generate_codes", "--count", "0", "--term-months", "1")
    assert not RedemptionCode.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a term larger than the column (PositiveSmallIntegerField) holds: DataError on PostgreSQL
        (["--count", "1", "--term-months", "40000"], "argument --term-months: must be at most 1200, got 40000"),
        (["--count", "1", "--term-months", "1", "--total-months", "99999"], "--total-months: must be at most 1200"),
        (["--count", "1", "--term-months", "9" * 40], "--term-months: must be at most 1200, got a 40-digit number"),
        (["--count", "1", "--term-months", "1", "--total-months", "9" * 400], "--total-months: must be at most 1200"),
        (["--count", "10001", "--term-months", "1"], "argument --count: must be at most 10000, got 10001"),
        (["--count", "9" * 31, "--term-months", "1"], "--count: must be at most 10000, got a 31-digit number"),
        # the batch label is a CharField(max_length=100)
        (["--count", "1", "--term-months", "1", "--batch", "x" * 101], "--batch: at most 100 characters, got 101"),
    ],
)
def test_generate_codes_refuses_out_of_range_input_precisely(args, message):
    with pytest.raises(CommandError) as raised:
        run("generate_codes", *args)
    assert message in str(raised.value)
    assert "Traceback" not in str(raised.value)
    assert not RedemptionCode.objects.exists()


def test_generate_codes_accepts_the_largest_allowed_values():
    run("generate_codes", "--count", "2", "--term-months", "1200", "--total-months", "1200", "--batch", "y" * 100)
    assert set(RedemptionCode.objects.values_list("term_months", "total_months", "batch")) == {(1200, 1200, "y" * 100)}


# -- add_team -------------------------------------------------------------------------------------------
def _raw_token(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_token FROM leases_team WHERE name = %s", [name])
        return cursor.fetchone()[0]


def test_add_team_reads_the_token_from_stdin_and_stores_it_encrypted(monkeypatch):
    token = "piped-secret-token-0123456789"
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))

    out, _err = run("add_team", "gamma", "--api-base", "https://provider.example/teams/gamma/", "--capacity", "5")

    assert out.strip() == "added team gamma (5 seats)"
    team = Team.objects.get(name="gamma")
    assert (team.api_token, team.capacity, team.provider) == (token, 5, "http")
    raw = _raw_token("gamma")
    assert raw and token not in raw
    assert decrypt_secret(raw) == token

    monkeypatch.setattr(sys, "stdin", io.StringIO("rotated-token-9876543210\n"))
    out, _err = run("add_team", "gamma", "--api-base", "https://provider.example/teams/gamma/", "--capacity", "8")
    assert out.strip() == "updated team gamma (8 seats)"
    assert Team.objects.count() == 1
    assert Team.objects.get(name="gamma").api_token == "rotated-token-9876543210"


def test_add_team_without_a_token_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    with pytest.raises(CommandError, match="no API token"):
        run("add_team", "gamma", "--api-base", "https://provider.example/", "--capacity", "5")
    assert not Team.objects.exists()


def test_add_team_with_a_bad_url_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("some-token-value\n"))
    with pytest.raises(CommandError, match="api_base"):
        run("add_team", "gamma", "--api-base", "not a url", "--capacity", "5")
    assert not Team.objects.exists()


# -- check_orphans ------------------------------------------------------------------------------------
def test_check_orphans_reports_a_member_without_a_lease(provider, make_team, make_lease):
    team = make_team("alpha")
    leased = make_lease(team, LeaseStatus.ACTIVE)
    provider.state.team("alpha").add_member(leased.email)
    provider.state.team("alpha").add_member("stowaway@example.com")
    out = io.StringIO()

    with pytest.raises(CommandError, match=r"1 problem\(s\), 0 team\(s\) not listed"):
        call_command("check_orphans", "--no-alert", stdout=out, stderr=io.StringIO())

    assert "stowaway@example.com" in out.getvalue()
    assert leased.email not in out.getvalue()
    assert out.getvalue().startswith("team alpha: 1 member(s) without a lease")


def test_check_orphans_without_problems(provider, make_team, make_lease):
    team = make_team("alpha")
    leased = make_lease(team, LeaseStatus.ACTIVE)
    provider.state.team("alpha").add_member(leased.email)

    out, _err = run("check_orphans", "--no-alert")

    assert out.strip() == "1 team(s) checked: no problems"
