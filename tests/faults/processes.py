"""Start, signal and watch real Celery processes for the fault tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

BASE = Path(__file__).resolve().parents[2]


def celery_worker(
    env: dict[str, str],
    log_path: Path,
    *,
    name: str,
    pool: str = "solo",
    concurrency: int = 1,
    queue: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen:
    """A ``celery worker`` process on this test's broker and queue, logging to ``log_path``."""
    env = {"CELERY_BROKER_URL": settings.CELERY_BROKER_URL, **env}
    log = open(log_path, "a")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "leasesite", "worker",
            f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
            "-Q", queue or settings.CELERY_TASK_DEFAULT_QUEUE,
            "-n", f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
            *extra_args,
        ],
        cwd=BASE, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def celery_beat(env: dict[str, str], log_path: Path, *, extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """A ``celery beat`` process with the database scheduler (django-celery-beat)."""
    env = {"CELERY_BROKER_URL": settings.CELERY_BROKER_URL, **env}
    log = open(log_path, "a")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "leasesite", "beat", "--loglevel=INFO",
            "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
            "--pidfile=", *extra_args,
        ],
        cwd=BASE, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (a prefork worker's pool processes), from /proc."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen, *, timeout: float = 20) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_for(predicate: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str = "") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)
