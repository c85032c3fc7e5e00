"""Fault family 9: bad input on every entry point changes nothing and is answered precisely.

- Every management command, run as a real process (``tests/faults/_h6_commands.py`` forks one per
  command line from a driver that set Django up once) against this test's PostgreSQL database:
  wrong types, negative and huge numbers, missing files, directories, malformed JSON/mongoexport,
  wrong encodings, empty files → exit code ≠ 0, the precise message, no traceback, and a
  ``pg_dump`` of the database identical before and after.
- ``/redeem/`` and ``/redeem/status/`` on a real gunicorn process: garbage of every kind, then
  1,000 submissions in a burst from 25 addresses and 16 threads.
- Admin operations forged by POST against leases in every state they do not allow.

(Argument checks already covered in-process by tests/tokens/test_bad_input.py,
tests/leases/test_commands.py and tests/leases/test_views.py are here only where the real
process adds something: the exit code and a clean stderr.)
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from django.urls import reverse

from leases.models import LeaseEvent, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.operations import OPERATIONS, operation_allowed
from tests.conftest import new_token_value
from tests.faults import _h6_support as h6
from tokens.models import BaomingToken

pytestmark = pytest.mark.django_db(transaction=True)

BASE = Path(__file__).resolve().parents[2]
HUGE = str(10**30)


def snapshot() -> str:
    """Every row of every table; sequence positions left out (a refused insert may use one up)."""
    text = h6.pg_dump().decode()
    return "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith(("SELECT pg_catalog.setval", "--", "\\restrict", "\\unrestrict"))
    )


def run_commands(env: dict[str, str], tmp_path: Path, cases: list[tuple[list[str], bytes]]) -> list[dict]:
    cases_path, results_path = tmp_path / "cases.json", tmp_path / "results.json"
    cases_path.write_text(
        json.dumps([{"argv": argv, "stdin": base64.b64encode(stdin).decode()} for argv, stdin in cases])
    )
    subprocess.run(
        [sys.executable, "-m", "tests.faults._h6_commands", str(cases_path), str(results_path)],
        cwd=BASE,
        env=env,
        check=True,
        timeout=300,
    )
    return json.loads(results_path.read_text())


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "in"
    d.mkdir()
    (d / "dir").mkdir()
    (d / "empty.csv").write_bytes(b"")
    (d / "blank.jsonl").write_bytes(b"\n  \n")
    (d / "gbk.csv").write_bytes("card_name,user_name,token\n张三,a,".encode("gbk") + new_token_value().encode() + b"\n")
    (d / "truncated.json").write_text('{"card_65a1": {"access_token": ')
    (d / "list.json").write_text("[1, 2]")
    good = new_token_value()
    (d / "mixed.mongo").write_text(
        json.dumps({"card": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "access_token": good, "uname": "a"}) + "\n{bad\n"
    )
    (d / "mixed.csv").write_text(f"card_name,user_name,token\n甲,a,{new_token_value()}\n乙,b,not-a-token\n")
    (d / "notsqlite.db").write_text("hello")
    (d / "empty.db").write_bytes(b"")
    with sqlite3.connect(d / "other.db") as db:
        db.execute("CREATE TABLE foo (x)")
    with sqlite3.connect(d / "wrongcols.db") as db:
        db.execute("CREATE TABLE member_leases (x)")
    return {path.name: str(path) for path in d.iterdir()}


def command_cases(f: dict[str, str]) -> list[tuple[list[str], bytes, str]]:
    """(argv, stdin, the message stderr must hold)."""
    cases = [
        (
            ["refresh_baoming_tokens", "--max-age-days", "abc"],
            "argument --max-age-days: expected a whole number, got 'abc'",
        ),
        (["refresh_baoming_tokens", "--max-age-days", "-1"], "argument --max-age-days: must be at least 1, got -1"),
        (["refresh_baoming_tokens", "--max-age-days", HUGE], "must be at most 36500, got a 31-digit number"),
        (["refresh_baoming_tokens", "--cleanup-days", "0"], "argument --cleanup-days: must be at least 1, got 0"),
        (
            ["refresh_baoming_tokens", "--scheduler", "--interval", "nan"],
            "argument --interval: must be a number above 0, got nan",
        ),
        (["refresh_baoming_tokens", "--scheduler", "--interval", "inf"], "must be a number above 0, got inf"),
        (["refresh_baoming_tokens", "--scheduler", "--interval-minutes", "-3"], "must be at least 1, got -3"),
        (
            ["refresh_baoming_tokens", "--log-file", "/nonexistent/dir/x.log"],
            "cannot open --log-file: No such file or directory",
        ),
        (["refresh_baoming_tokens", "--log-file", f["dir"]], "cannot open --log-file: Is a directory"),
        (["cleanup_baoming_tokens"], "the following arguments are required: --days"),
        (["cleanup_baoming_tokens", "--days", "-5"], "argument --days: must be at least 1, got -5"),
        (["cleanup_baoming_tokens", "--days", HUGE], "argument --days: must be at most 36500"),
        (["cleanup_baoming_tokens", "--days", "30", "--log-file", f["dir"]], "cannot open --log-file: Is a directory"),
        (["import_baoming_tokens", f["dir"] + "/missing.csv"], "missing.csv: no such file"),
        (["import_baoming_tokens", f["dir"]], f"{f['dir']}: Is a directory"),
        (["import_baoming_tokens", f["empty.csv"]], f"{f['empty.csv']}: the file is empty (nothing to import)"),
        (["import_baoming_tokens", f["blank.jsonl"]], "the file is empty (nothing to import)"),
        (["import_baoming_tokens", f["empty.db"]], "the file is empty (nothing to import)"),
        (["import_baoming_tokens", f["gbk.csv"]], f"{f['gbk.csv']}:2: not UTF-8 text (save the file as UTF-8)"),
        (
            ["import_baoming_tokens", f["truncated.json"], "--format", "json-store"],
            f"{f['truncated.json']}:1: not valid JSON",
        ),
        (["import_baoming_tokens", f["list.json"], "--format", "json-store"], "not the old tool's JSON store"),
        (["import_baoming_tokens", f["mixed.mongo"]], f"{f['mixed.mongo']}:2: not valid JSON"),
        (["import_baoming_tokens", f["mixed.csv"]], f"{f['mixed.csv']}:3: "),
        (
            ["import_baoming_tokens", f["mixed.mongo"], "--cards", f["dir"] + "/nope.json"],
            "--cards " + f["dir"] + "/nope.json: no such file",
        ),
        (["import_baoming_tokens", f["mixed.mongo"], "--cards", f["gbk.csv"]], "not UTF-8 text"),
        (
            ["import_baoming_tokens", f["mixed.csv"], "--old-time-zone", "Mars/Olympus"],
            "unknown time zone 'Mars/Olympus'",
        ),
        (["import_baoming_tokens", f["mixed.csv"], "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["rotate_token_keys", "--chunk-size", "0"], "argument --chunk-size: must be at least 1, got 0"),
        (["rotate_token_keys", "--chunk-size", HUGE], "must be at most 10000, got a 31-digit number"),
        (["sync_joins", "--team", "nosuch"], "no team named 'nosuch' (teams: alpha)"),
        (["sync_joins", "--email", "bad"], "argument --email: 'bad' is not a valid email address"),
        (["run_transfers", "--email", "bad@"], "argument --email: 'bad@' is not a valid email address"),
        (["generate_codes", "--count", "0", "--term-months", "1"], "argument --count: must be at least 1, got 0"),
        (["generate_codes", "--count", HUGE, "--term-months", "1"], "argument --count: must be at most 10000"),
        (
            ["generate_codes", "--count", "1", "--term-months", "-1"],
            "argument --term-months: must be at least 1, got -1",
        ),
        (
            ["generate_codes", "--count", "1", "--term-months", "1", "--csv", "/nonexistent/x.csv"],
            "cannot write --csv: No such file",
        ),
        (
            ["generate_codes", "--count", "1", "--term-months", "1", "--csv", f["dir"]],
            "cannot write --csv: Is a directory",
        ),
        (
            ["generate_codes", "--count", "1", "--term-months", "1", "--batch", "b" * 5000],
            "--batch: at most 100 characters, got 5000",
        ),
        (["generate_codes", "--count", "1", "--term-months", "1", "--pool", "bad pool!"], "'bad pool!'"),
        (
            ["add_team", "t1", "--api-base", "http://x/", "--capacity", "-1", "--no-token"],
            "argument --capacity: must be at least 1, got -1",
        ),
        (
            ["add_team", "t1", "--api-base", "http://x/", "--capacity", HUGE, "--no-token"],
            "--capacity: must be at most 1000000",
        ),
        (["add_team", "t1", "--api-base", "ftp://x/", "--capacity", "1", "--no-token"], "api_base: "),
        (
            ["add_team", "t1", "--api-base", "http://x/", "--capacity", "1", "--provider", "bogus", "--no-token"],
            "invalid choice: 'bogus'",
        ),
        (["add_team", "n" * 500, "--api-base", "http://x.example/", "--capacity", "1", "--no-token"], "name: "),
        (["cancel_lease", "nobody@example.com"], "nobody@example.com"),
        (["cancel_lease", "not-an-email"], "argument EMAIL: 'not-an-email' is not a valid email address"),
        (["cancel_lease", "a@example.com", "--reason", "r" * 100_000], "--reason: at most 500 characters, got 100000"),
        (["import_legacy_db", f["dir"] + "/missing.db"], "missing.db"),
        (["import_legacy_db", f["dir"]], f["dir"]),
        (["import_legacy_db", f["notsqlite.db"]], "file is not a database"),
        (["import_legacy_db", f["empty.db"]], "member_leases"),
        (["import_legacy_db", f["other.db"]], "member_leases"),
        (["import_legacy_db", f["wrongcols.db"]], "email"),
        (["check_health", "--only", "bogus"], "argument --only: choose from database, redis, worker, beat"),
        (["start", "--port", "99999"], "argument --port: a port is a whole number from 1 to 65535, got 99999"),
        (["start", "--port", "abc"], "got 'abc'"),
        (["add_baoming_token", "--card-name", "c" * 5000], "card name is longer than 100 characters"),
    ]
    with_stdin = [
        (["add_baoming_token", "--card-name", "x"], b"", "token must be 32 hexadecimal characters"),
        (
            ["add_baoming_token", "--card-name", "x"],
            b"\xff\xfe\x00bad\n",
            "the token on standard input is not UTF-8 text",
        ),
        (["add_baoming_token", "--card-name", "x"], b"a" * 1_000_000, "token must be 32 hexadecimal characters"),
        (["add_team", "t2", "--api-base", "http://x.example/", "--capacity", "1"], b"", "no API token given"),
    ]
    return [(argv, b"", message) for argv, message in cases] + with_stdin


def test_every_command_refuses_bad_input_precisely_and_changes_nothing(live_server_env, tmp_path, files, make_team):
    alpha = make_team("alpha")
    BaomingToken.objects.create(card_name="已有", token=new_token_value())
    MemberLease.objects.create(
        team=alpha, pool="default", email="a@example.com", term_months=1, status=LeaseStatus.FAILED
    )
    RedemptionCode.objects.create(code="H6-EXISTING-CODE", term_months=1)
    h6.recount_seats()
    cases = command_cases(files)
    before = snapshot()
    results = run_commands(live_server_env, tmp_path, [(argv, stdin) for argv, stdin, _message in cases])
    after = snapshot()

    wrong = []
    for (argv, _stdin, message), result in zip(cases, results, strict=True):
        shown = " ".join(arg[:40] for arg in argv)
        if result["code"] == 0:
            wrong.append(f"{shown}: exit code 0 ({result['stdout'][-300:]!r})")
        elif "Traceback" in result["stderr"]:
            wrong.append(f"{shown}: traceback\n{result['stderr'][-2000:]}")
        elif message not in result["stderr"]:
            wrong.append(f"{shown}: {message!r} not in stderr {result['stderr'][-500:]!r}")
    assert not wrong, "\n".join(wrong)
    assert after == before, "a refused command changed the database"


# -- the public forms on a real web process ------------------------------------------------------------
@pytest.fixture
def web(live_server_env, tmp_path):
    h6.clear_attempt_windows()
    server = h6.start_gunicorn(
        {**live_server_env, "LEASE_REDEEM_TRUST_X_FORWARDED_FOR": "true", "LEASE_REDEEM_RATE_LIMIT": "10"},
        tmp_path,
        workers=2,
        threads=8,
    )
    yield server
    server.stop()
    h6.clear_attempt_windows()


_addresses = iter(range(1, 60000))


def new_address() -> str:
    n = next(_addresses)
    return f"10.{66 + n // 65536 % 100}.{n // 256 % 256}.{n % 256}"


def form_session(web: h6.WebServer, path: str) -> tuple[requests.Session, str]:
    session = requests.Session()
    session.get(f"{web.url}{path}", timeout=30)
    return session, session.cookies["csrftoken"]


def test_redeem_and_lookup_answer_garbage_without_an_error_and_change_nothing(web, make_team):
    make_team("alpha", capacity=5)
    used = RedemptionCode.objects.create(code="H6-USED-0001", term_months=1)
    other_pool = RedemptionCode.objects.create(code="H6-OTHERPOOL-1", term_months=1, pool="other")
    fresh = RedemptionCode.objects.create(code="H6-FRESH-0001", term_months=1)
    session, csrf = form_session(web, "/redeem/")
    first = session.post(
        f"{web.url}/redeem/",
        data={"csrfmiddlewaretoken": csrf, "code": used.code, "email": "u@example.com"},
        headers={"X-Forwarded-For": new_address()},
        allow_redirects=False,
        timeout=30,
    )
    assert first.status_code == 302
    h6.recount_seats()
    lease_rows = lambda: sorted(MemberLease.objects.values_list("pk", "email", "status", "team_id"))  # noqa: E731
    code_rows = lambda: sorted(RedemptionCode.objects.values_list("code", "lease_id", "redeemed_at"))  # noqa: E731
    before = (lease_rows(), code_rows(), LeaseEvent.objects.count())

    garbage = {
        "huge code": {"code": "A" * 1_000_000, "email": "g@example.com"},
        "huge email": {"code": fresh.code, "email": "a" * 1_000_000 + "@example.com"},
        "nul in code": {"code": "H6-FRESH\x00-0001", "email": "g@example.com"},
        "nul in email": {"code": fresh.code, "email": "g\x00@example.com"},
        "control chars": {"code": "\u202e\x07\x1b[31m" + fresh.code, "email": "g@example.com\u200b"},
        "emoji and surrogates": {"code": "🎟️" * 20, "email": "😀@例子.测试"},
        "used code": {"code": used.code, "email": "someone-else@example.com"},
        "other pool code, no team there": {"code": other_pool.code.lower(), "email": "p@example.com"},
        "empty": {"code": "", "email": ""},
        "lists": {"code": [fresh.code, used.code], "email": ["a@example.com", "b@example.com"]},
    }
    answers = {}
    for path in ("/redeem/", "/redeem/status/"):
        for name, data in garbage.items():
            if name == "other pool code, no team there" and path == "/redeem/":
                continue  # a valid redemption (it waits for a seat of its pool): not garbage there
            response = session.post(
                f"{web.url}{path}",
                data={"csrfmiddlewaretoken": csrf, **data},
                headers={"X-Forwarded-For": new_address()},
                allow_redirects=False,
                timeout=60,
            )
            answers[f"{path} {name}"] = response.status_code
        raw = {
            "json body": ("application/json", json.dumps({"code": fresh.code, "email": "j@example.com"}).encode()),
            "text body": ("text/plain", b"code=x&email=y"),
            "broken multipart": ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data\r\n\r\n"),
            "binary": ("application/x-www-form-urlencoded", bytes(range(256)) * 10),
            "3 MB form": ("application/x-www-form-urlencoded", b"code=" + b"A" * 3_000_000 + b"&email=x%40example.com"),
            "bad percent-encoding": ("application/x-www-form-urlencoded", b"code=%ZZ%&email=%C0%AF"),
        }
        for name, (content_type, body) in raw.items():
            try:
                response = requests.post(
                    f"{web.url}{path}",
                    data=body,
                    allow_redirects=False,
                    timeout=60,
                    cookies=session.cookies,
                    headers={"Content-Type": content_type, "X-Forwarded-For": new_address(), "X-CSRFToken": csrf},
                )
            except requests.ConnectionError:
                # The server answered (400, see the access log below) before reading all of a body
                # this big, then closed the connection the client was still sending on.
                assert name == "3 MB form", name
                answers[f"{path} {name}"] = 400
                continue
            answers[f"{path} {name}"] = response.status_code
        no_csrf = requests.post(
            f"{web.url}{path}",
            data={"code": fresh.code, "email": "c@example.com"},
            headers={"X-Forwarded-For": new_address()},
            allow_redirects=False,
            timeout=30,
        )
        answers[f"{path} missing CSRF"] = no_csrf.status_code
        answers[f"{path} PUT"] = session.put(f"{web.url}{path}", timeout=30).status_code
    lookup_other = session.post(
        f"{web.url}/redeem/status/",
        allow_redirects=False,
        timeout=30,
        data={"csrfmiddlewaretoken": csrf, "code": fresh.code, "email": "u@example.com"},
        headers={"X-Forwarded-For": new_address()},
    )
    answers["/redeem/status/ another lease's email with an unused code"] = lookup_other.status_code

    unexpected = {name: status for name, status in answers.items() if status not in (400, 403, 405, 413)}
    assert not unexpected, unexpected
    assert answers["/redeem/ missing CSRF"] == 403 and answers["/redeem/ used code"] == 400
    assert answers["/redeem/ PUT"] in (403, 405)  # CSRF refuses it before the method check
    access = web.access_log.read_text()
    assert access.count('"POST /redeem/ HTTP/1.1" 400') >= len(garbage) - 1 + len(raw)  # incl. the 3 MB form
    assert not re.search(r'" 5\d\d ', access)
    assert (lease_rows(), code_rows(), LeaseEvent.objects.count()) == before
    assert not h6.log_problems(web.logs())


def test_a_burst_of_1000_submissions_gets_429s_not_errors_and_seats_nobody_twice(web, make_team):
    make_team("alpha", capacity=15)
    make_team("beta", capacity=15)
    codes = [RedemptionCode.objects.create(code=f"H6-BURST-{n:04d}", term_months=1).code for n in range(40)]
    addresses = [new_address() for _ in range(25)]
    sessions = threading.local()
    lock = threading.Lock()
    answers: Counter = Counter()
    successes: list[tuple[str, str]] = []

    def submit(n: int) -> None:
        if not hasattr(sessions, "s"):
            sessions.s, sessions.csrf = form_session(web, "/redeem/")
        code = codes[n % len(codes)] if n % 4 else f"H6-NOPE-{n:04d}"  # a quarter are unknown codes
        email = f"burst{n % 97}@example.com"  # the same customer tries again, with other codes too
        response = sessions.s.post(
            f"{web.url}/redeem/",
            allow_redirects=False,
            timeout=60,
            data={"csrfmiddlewaretoken": sessions.csrf, "code": code, "email": email},
            headers={"X-Forwarded-For": addresses[n % len(addresses)]},
        )
        with lock:
            answers[response.status_code] += 1
            if response.status_code == 302:
                successes.append((code, email))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(submit, range(1000)))

    print(f"burst of 1000: answers {dict(answers)}, {MemberLease.objects.count()} lease(s) created")
    assert sum(answers.values()) == 1000
    assert set(answers) <= {302, 400, 429}, answers
    assert answers[429] >= 1000 - 25 * 10 - 16  # 10 attempts per address per window (a few in flight)
    assert answers[302] >= 1
    # Every code used at most once, by one lease; no email seated twice; no team over capacity.
    redeemed = RedemptionCode.objects.filter(code__in=codes, lease__isnull=False)
    assert redeemed.count() == MemberLease.objects.count()
    leases = list(MemberLease.objects.values_list("email", "status", "team_id"))
    assert len({email for email, *_ in leases}) == len(leases)
    by_code = dict(successes)
    for code in redeemed.select_related("lease"):
        assert by_code[code.code] == code.lease.email  # the customer who got the 302 holds it
    seated = Counter(team for _email, status, team in leases if status != LeaseStatus.WAITING)
    assert all(seated[team.pk] <= team.capacity for team in Team.objects.all())
    assert not h6.log_problems(web.logs())
    assert not re.search(r'" 5\d\d ', web.access_log.read_text())


# -- admin operations forged against states they do not allow -------------------------------------------
def test_forged_admin_operations_on_wrong_states_are_refused_and_change_nothing(admin_client, make_team, make_lease):
    alpha = make_team("alpha", capacity=50)
    leases = {status: make_lease(None if status == LeaseStatus.WAITING else alpha, status) for status in LeaseStatus}
    h6.recount_seats()

    def state() -> list:
        columns = ("pk", "status", "team_id", "attempts", "next_attempt_at", "cancel_requested_at")
        return [*sorted(MemberLease.objects.values_list(*columns)), LeaseEvent.objects.count()]

    before = state()
    refused = 0
    for operation in OPERATIONS:
        for status, lease in leases.items():
            if operation_allowed(operation, status):
                continue
            url = reverse("admin:leases_memberlease_operate", args=[lease.pk, operation.name])
            response = admin_client.post(url, {"confirmed": "yes"}, follow=True)
            assert response.status_code == 200, (operation.name, status)
            text = response.content.decode()
            assert "errornote" in text or 'class="error"' in text, (operation.name, status)
            refused += 1
    assert refused >= 15
    # The bulk actions, forged from the list page with every lease selected (confirmed too).
    changelist = reverse("admin:leases_memberlease_changelist")
    all_ids = [str(lease.pk) for lease in leases.values()]
    wrong_state = {
        "retry_transfer": [s for s in LeaseStatus if s != LeaseStatus.FAILED],
        "reset_to_active": [s for s in LeaseStatus if s != LeaseStatus.FAILED],
        "force_transfer": [s for s in LeaseStatus if s != LeaseStatus.ACTIVE],
        "cancel_leases": [LeaseStatus.CANCELLED, LeaseStatus.EXPIRED],
    }
    for action, statuses in wrong_state.items():
        ids = [str(leases[s].pk) for s in statuses]
        for confirmed in ("", "yes"):
            response = admin_client.post(
                changelist,
                {"action": action, "_selected_action": ids, "confirmed": confirmed, "index": "0"},
                follow=True,
            )
            assert response.status_code == 200, (action, confirmed, response.content[:3000])
    # Unknown operation names and ids, and a GET of a dangerous one, change nothing either.
    assert (
        admin_client.post(reverse("admin:leases_memberlease_operate", args=[leases["active"].pk, "nosuch"])).status_code
        == 302
    )
    assert admin_client.post(reverse("admin:leases_memberlease_operate", args=[999999, "cancel"])).status_code == 404
    assert (
        admin_client.get(reverse("admin:leases_memberlease_operate", args=[leases["active"].pk, "cancel"])).status_code
        == 200
    )
    assert (
        admin_client.post(changelist, {"action": "nosuch", "_selected_action": all_ids}, follow=True).status_code == 200
    )
    # The confirmation page of a cancel lists a waiting lease too (it has no team yet).
    waiting = leases[LeaseStatus.WAITING]
    page = admin_client.post(changelist, {"action": "cancel_leases", "_selected_action": [str(waiting.pk)]})
    assert page.status_code == 200 and waiting.email in page.content.decode()
    assert state() == before
