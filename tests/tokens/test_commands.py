"""The management commands: the old tool's flags, clear errors, exit codes."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from leasesite.locks import lock_acquire
from tests.conftest import invalid, new_token_value, server_error
from tokens.models import BaomingToken, RefreshRun, RunTrigger
from tokens.services.refresh import REFRESH_LOCK_NAME

pytestmark = pytest.mark.django_db
BASE = Path(__file__).resolve().parents[2]


def test_refresh_command_runs_and_writes_the_log_file(upstream, make_token, tmp_path, capsys):
    good, bad = make_token(card_name="张三"), make_token(card_name="李四")
    upstream.answers[bad.token] = invalid
    log_file = tmp_path / "refresh.log"
    call_command("refresh_baoming_tokens", "--log-file", str(log_file), "--verbose")
    out = capsys.readouterr().out
    assert "total 2, ok 1" in out and "deleted 1" in out
    run = RefreshRun.objects.get()
    assert run.trigger == RunTrigger.COMMAND
    log = log_file.read_text(encoding="utf-8")
    for label in (
        "报名工具 Token 刷新开始",
        "名片: 张三",
        "最后使用",
        "结果: 有效",
        "刷新统计",
        "总数: 2",
        "成功: 1",
        "删除: 1",
    ):
        assert label in log
    assert good.token not in log and bad.token not in log


def test_refresh_command_exits_non_zero_when_the_run_failed(upstream, make_token):
    token = make_token()
    upstream.answers[token.token] = server_error
    with pytest.raises(CommandError) as excinfo:
        call_command("refresh_baoming_tokens")
    assert excinfo.value.returncode == 1


def test_refresh_command_refuses_while_another_run_holds_the_lock(upstream, make_token):
    make_token()
    assert lock_acquire(name=REFRESH_LOCK_NAME, owner="someone-else", ttl_seconds=60)
    with pytest.raises(CommandError) as excinfo:
        call_command("refresh_baoming_tokens")
    assert excinfo.value.returncode == 75
    assert not RefreshRun.objects.exists()


def test_max_age_days_and_cleanup_days(upstream, make_token, capsys):
    now = timezone.now()
    recent = make_token(last_used=now - timedelta(days=1))
    # Unused for 60 days, and the upstream answered about it lately (an earlier full run).
    make_token(last_used=now - timedelta(days=60), last_answered_at=now - timedelta(days=1))
    call_command("refresh_baoming_tokens", "--max-age-days", "7", "--cleanup-days", "30")
    assert [r["token"] for r in upstream.requests] == [recent.token]
    assert list(BaomingToken.objects.values_list("id", flat=True)) == [recent.pk]
    assert "cleanup run" in capsys.readouterr().out


def test_dry_run_flag(upstream, make_token):
    token = make_token()
    upstream.answers[token.token] = invalid
    call_command("refresh_baoming_tokens", "--dry-run")
    assert BaomingToken.objects.filter(pk=token.pk).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "2"], "--interval only makes sense with --scheduler"),
        (["--run-immediately"], "--run-immediately only makes sense with --scheduler"),
    ],
)
def test_flag_combinations_are_checked(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("refresh_baoming_tokens", *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-age-days", "0"], "must be at least 1"),
        (["--max-age-days", "seven"], "expected a whole number"),
        (["--scheduler", "--interval", "-1"], "must be a number above 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_with_a_precise_message(args, message):
    result = subprocess.run(
        [sys.executable, "manage.py", "refresh_baoming_tokens", *args],
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.django_db(transaction=True)
def test_scheduler_runs_immediately_and_stops_on_sigterm(upstream, make_token, live_server_env):
    import signal
    import time

    make_token()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "refresh_baoming_tokens", "--scheduler", "--interval", "1", "--run-immediately"],
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
        assert upstream.requests, "the scheduler did not run immediately"
        # Between runs, SIGTERM stops the scheduler cleanly (mid-run: see test_interrupted.py).
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "scheduler stopped" in out
    assert RefreshRun.objects.get().status == "succeeded"


def test_cleanup_command(make_token, capsys):
    make_token(created_at=timezone.now() - timedelta(days=40), last_answered_at=timezone.now() - timedelta(days=1))
    make_token()
    call_command("cleanup_baoming_tokens", "--days", "30")
    assert "deleted 1 token" in capsys.readouterr().out
    assert BaomingToken.objects.count() == 1


def test_add_token_reads_stdin_not_argv(monkeypatch, capsys):
    token = new_token_value()
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    call_command("add_baoming_token", "--card-name", "张三", "--user-name", "z")
    out = capsys.readouterr().out
    assert token not in out and f"{token[:4]}…{token[-4:]}" in out
    assert BaomingToken.objects.get().token == token


def test_add_token_rejects_bad_and_duplicate_tokens(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("nope\n"))
    with pytest.raises(CommandError, match="32 hexadecimal"):
        call_command("add_baoming_token", "--card-name", "x")
    token = new_token_value()
    BaomingToken.objects.create(card_name="a", token=token)
    monkeypatch.setattr(sys, "stdin", io.StringIO(token))
    with pytest.raises(CommandError, match="already stored"):
        call_command("add_baoming_token", "--card-name", "x")


def test_import_command(tmp_path, capsys):
    path = tmp_path / "tokens.csv"
    path.write_text(f"card_name,user_name,token\n甲,a,{'1' * 32}\n乙,b,bad\n", encoding="utf-8")
    with pytest.raises(CommandError, match=r"1 bad row.*nothing was imported"):
        call_command("import_baoming_tokens", str(path))
    captured = capsys.readouterr()
    assert f"{path}:3: token must be 32 hexadecimal characters" in captured.err
    assert "imported 0" in captured.out
    assert BaomingToken.objects.count() == 0  # all or nothing (see test_bad_input.py)


def test_import_command_missing_file(tmp_path):
    with pytest.raises(CommandError, match="no such file"):
        call_command("import_baoming_tokens", str(tmp_path / "missing.csv"))
