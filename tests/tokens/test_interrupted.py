"""SIGTERM to the refresh command closes its run as interrupted, alerts, releases the lock and
exits non-zero (issue defect 10). Real subprocesses against a real local upstream whose every
answer is "429, retry after two minutes", so the run is certainly in the middle of its work when
the signal arrives."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leasesite.models import JobLock
from tests.conftest import json_answer
from tokens.models import BaomingToken, RefreshRun
from tokens.services.refresh import REFRESH_LOCK_NAME

pytestmark = pytest.mark.django_db(transaction=True)
BASE = Path(__file__).resolve().parents[2]
EXIT_SIGTERM = 128 + signal.SIGTERM


def start_command(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "refresh_baoming_tokens", *args],
        cwd=BASE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def terminate_mid_run(proc: subprocess.Popen, upstream) -> tuple[str, str]:
    try:
        deadline = time.monotonic() + 60
        while not upstream.requests and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert upstream.requests, "the command never reached the upstream"
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=30)
    finally:
        proc.kill()


@pytest.fixture
def slow_tokens(upstream, make_token) -> list[BaomingToken]:
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = json_answer({}, status=429, headers={"Retry-After": "120"})
    return tokens


def assert_interrupted(out: str, err: str, returncode: int, tokens: list[BaomingToken]) -> None:
    assert returncode == EXIT_SIGTERM, (out, err)
    run = RefreshRun.objects.get()
    assert run.status == "interrupted" and run.ended_at is not None
    assert not JobLock.objects.filter(name=REFRESH_LOCK_NAME).exists()
    assert "ALERT" in err and f"#{run.pk}" in err
    assert "Traceback" not in err
    assert not BaomingToken.objects.filter(last_checked_at__isnull=False).exists()


def test_sigterm_interrupts_a_refresh_run(upstream, slow_tokens, live_server_env):
    proc = start_command(live_server_env)
    out, err = terminate_mid_run(proc, upstream)
    assert_interrupted(out, err, proc.returncode, slow_tokens)


def test_sigterm_interrupts_a_scheduler_run_in_progress(upstream, slow_tokens, live_server_env):
    proc = start_command(live_server_env, "--scheduler", "--interval", "1", "--run-immediately")
    out, err = terminate_mid_run(proc, upstream)
    assert_interrupted(out, err, proc.returncode, slow_tokens)
