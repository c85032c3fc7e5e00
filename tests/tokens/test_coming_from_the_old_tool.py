"""README "Coming from the old refresh tool", followed from top to bottom: export, import (dry run
first), the first refresh — as separate ``manage.py`` processes against a real local upstream — and
the old tool's ``--interval-minutes``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from leasesite.crypto import fingerprint_secret
from tests.conftest import invalid, new_token_value
from tests.tokens.test_import_old_tool import card_doc, json_lines, oid, store_entry, store_text, token_doc
from tokens.management.commands.refresh_baoming_tokens import interval_text, scheduler_interval_hours
from tokens.models import BaomingToken, DeletionReason, RefreshRun, TokenDeletion

BASE = Path(__file__).resolve().parents[2]
README = (BASE / "README.md").read_text(encoding="utf-8")
SECTION = README.split("## Coming from the old refresh tool", 1)[-1].split("\n## ", 1)[0]

# The README's commands, as the test runs them (the files are named as in the README).
DRY_RUN = ["import_baoming_tokens", "tokens.jsonl", "--cards", "cards.jsonl", "--dry-run"]
IMPORT = ["import_baoming_tokens", "tokens.jsonl", "--cards", "cards.jsonl"]
IMPORT_STORE = ["import_baoming_tokens", "baoming_tokens.json", "--cards", "cards.jsonl"]
FIRST_REFRESH = ["refresh_baoming_tokens"]


def test_the_readme_section_names_the_commands_this_test_runs():
    assert "## Coming from the old refresh tool" in README
    for command in (DRY_RUN, IMPORT, IMPORT_STORE, FIRST_REFRESH):
        assert "manage.py " + " ".join(command) in SECTION, command
    for export in ("--collection baoming_tokens --out tokens.jsonl", "--collection cards --out cards.jsonl"):
        assert export in SECTION
    assert "--interval-minutes" in SECTION


def manage(env: dict, cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BASE / "manage.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.django_db(transaction=True)
def test_export_import_and_first_refresh_as_the_readme_says(tmp_path, upstream, live_server_env):
    alive, dead, stored_earlier = new_token_value(), new_token_value(), new_token_value()
    old_login = new_token_value()
    store_only = new_token_value()
    (tmp_path / "cards.jsonl").write_text(
        json_lines([card_doc(1, "名片1"), card_doc(2, "名片2"), card_doc(3, "名片3"), card_doc(4, "名片4")]),
        encoding="utf-8",
    )
    (tmp_path / "tokens.jsonl").write_text(
        json_lines(
            [
                token_doc(1, token=alive, uname="小红", unionid="u-1", pic="https://thirdwx.qlogo.cn/a/132"),
                token_doc(2, token=dead, uname="小明", unionid="u-2", canonical=True),
                token_doc(3, token=stored_earlier),
            ]
        ),
        encoding="utf-8",
    )
    # The older JSON store of a desktop: one person already in MongoDB (u-1, an older login), one not.
    (tmp_path / "baoming_tokens.json").write_text(
        store_text(
            {
                f"card_{oid(1)}": store_entry(token=old_login, unionid="u-1", saved=1700000000.0),
                f"card_{oid(4)}": store_entry(token=store_only, uname="小刚", saved=1739168438.0),
            }
        ),
        encoding="utf-8",
    )
    BaomingToken.objects.create(card_name="已有", token=stored_earlier)  # added by hand before
    upstream.answers[dead] = invalid

    dry = manage(live_server_env, tmp_path, DRY_RUN)
    assert dry.returncode == 0, dry.stderr
    assert "would import 2, would skip 1 duplicate(s), 0 bad row(s)" in dry.stdout
    assert "tokens.jsonl:1: would import: card 名片1 | user 小红" in dry.stdout
    assert BaomingToken.objects.count() == 1  # the dry run wrote nothing

    real = manage(live_server_env, tmp_path, IMPORT)
    assert real.returncode == 0, real.stderr
    assert "imported 2, skipped 1 duplicate(s), 0 bad row(s)" in real.stdout
    store = manage(live_server_env, tmp_path, IMPORT_STORE)
    assert store.returncode == 0, store.stderr
    assert "imported 1, skipped 1 duplicate(s)" in store.stdout
    assert "the same person (unionid) is already stored" in store.stdout
    imported = {token.card_name: token for token in BaomingToken.objects.all()}
    assert set(imported) == {"已有", "名片1", "名片2", "名片4"}
    assert imported["名片1"].last_used is not None and imported["名片4"].last_used is None

    refresh = manage(live_server_env, tmp_path, FIRST_REFRESH)
    assert refresh.returncode == 0, refresh.stderr
    for token in (alive, dead, stored_earlier, store_only):
        assert upstream.calls_for(token) == 1, token
    assert upstream.calls_for(old_login) == 0  # skipped as a duplicate: never imported
    run = RefreshRun.objects.get()
    assert (run.status, run.total, run.ok, run.invalid, run.deleted) == ("succeeded", 4, 3, 1, 1)
    refreshed = {token.card_name: token for token in BaomingToken.objects.all()}
    assert set(refreshed) == {"已有", "名片1", "名片4"}
    assert refreshed["名片1"].last_used > imported["名片1"].last_used
    assert refreshed["名片4"].last_used is not None
    deletion = TokenDeletion.objects.get()
    assert (deletion.card_name, deletion.reason) == ("名片2", DeletionReason.INVALID)
    assert deletion.fingerprint == fingerprint_secret(dead)
    for output in (dry, real, store, refresh):
        for token in (alive, dead, stored_earlier, old_login, store_only):
            assert token not in output.stdout + output.stderr


# --- the old tool's --interval-minutes -----------------------------------------------------------


def test_interval_minutes_is_interval_in_hours_divided_by_sixty():
    assert scheduler_interval_hours(interval=None, interval_minutes=10) == pytest.approx(10 / 60)
    assert scheduler_interval_hours(interval=None, interval_minutes=90) == 1.5
    assert scheduler_interval_hours(interval=2.0, interval_minutes=None) == 2.0
    assert scheduler_interval_hours(interval=None, interval_minutes=None) is None
    assert interval_text(10 / 60) == "10 min" and interval_text(1.5) == "1.5 h"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "--interval", "6", "--interval-minutes", "10"], "not both"),
        (["--interval-minutes", "10"], "--interval-minutes only makes sense with --scheduler"),
    ],
)
def test_interval_minutes_combinations_are_checked(db, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("refresh_baoming_tokens", *args)
    assert not RefreshRun.objects.exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be at least 1, got 0"),
        ("-5", "must be at least 1, got -5"),
        ("1.5", "expected a whole number, got '1.5'"),
        ("ten", "expected a whole number, got 'ten'"),
        ("527041", "must be at most 527040, got 527041"),
        ("9" * 5000, "must be at most 527040, got a 5000-digit number"),
    ],
)
def test_bad_interval_minutes_exit_2_with_a_precise_message(value, message):
    result = subprocess.run(
        [sys.executable, "manage.py", "refresh_baoming_tokens", "--scheduler", "--interval-minutes", value],
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
    )
    assert result.returncode == 2
    assert "argument --interval-minutes" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.django_db(transaction=True)
def test_the_scheduler_with_interval_minutes_runs_and_says_its_interval(upstream, make_token, live_server_env):
    token = make_token()
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "refresh_baoming_tokens",
            "--scheduler",
            "--interval-minutes",
            "10",
            "--run-immediately",
        ],
        cwd=BASE,
        env=live_server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not RefreshRun.objects.filter(ended_at__isnull=False).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert upstream.calls_for(token.token) == 1, "the scheduler did not run immediately"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "scheduler: refreshing every 10 min" in out
    assert "scheduler stopped" in out
