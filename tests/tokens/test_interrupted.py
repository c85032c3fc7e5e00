"""SIGTERM to the refresh command closes its run as interrupted, alerts, releases the lock and
exits non-zero (issue defect 10). Real subprocesses against a real local upstream whose every
answer is "429, retry after two minutes", so the run is certainly in the middle of its work when
the signal arrives."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from leasesite.models import JobLock
from tests.conftest import json_answer
from tokens.models import BaomingToken, RefreshRun
from tokens.services.refresh import REFRESH_LOCK_NAME

pytestmark = pytest.mark.django_db(transaction=True)
BASE = Path(__file__).resolve().parents[2]
EXIT_SIGTERM = 128 + signal.SIGTERM
# The commands here get two-minute pauses from the upstream: they share a rate limiter (Redis
# database) of their own, so other test sessions on the machine neither wait on it nor reset it.
PRIVATE_REDIS = "redis://127.0.0.1:6379/13"
LIMITER_KEY = "leasesite:ratelimit:baoming"


@pytest.fixture
def private_limiter(live_server_env) -> Iterator[tuple[dict[str, str], redis.Redis]]:
    client = redis.Redis.from_url(PRIVATE_REDIS)
    client.delete(LIMITER_KEY)
    yield {**live_server_env, "REDIS_URL": PRIVATE_REDIS}, client
    client.delete(LIMITER_KEY)


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


def test_sigterm_interrupts_a_refresh_run(upstream, slow_tokens, private_limiter):
    proc = start_command(private_limiter[0])
    out, err = terminate_mid_run(proc, upstream)
    assert_interrupted(out, err, proc.returncode, slow_tokens)


def test_sigterm_interrupts_a_scheduler_run_in_progress(upstream, slow_tokens, private_limiter):
    proc = start_command(private_limiter[0], "--scheduler", "--interval", "1", "--run-immediately")
    out, err = terminate_mid_run(proc, upstream)
    assert_interrupted(out, err, proc.returncode, slow_tokens)


def test_sigterm_while_every_check_sleeps_inside_the_shared_limiter(upstream, make_token, private_limiter, settings):
    """Another worker was told "retry after two minutes": the shared limiter holds every check of
    this command asleep. SIGTERM must still close the run and end the process at once."""
    from leasesite.ratelimit import RedisRateLimiter
    from tokens.models import RefreshBatch

    env, client = private_limiter
    tokens = [make_token() for _ in range(3)]
    RedisRateLimiter(client, LIMITER_KEY, settings.BAOMING_RATE_LIMIT).pause(120)
    proc = start_command(env)
    try:
        deadline = time.monotonic() + 60
        while not RefreshBatch.objects.filter(status="claimed").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.pttl(LIMITER_KEY) > 60_000, "the pause is gone: the test would prove nothing"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert_interrupted(out, err, proc.returncode, tokens)
    assert upstream.requests == []
