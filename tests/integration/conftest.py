"""Real Celery worker processes on the real Redis broker, for the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings

BASE = Path(__file__).resolve().parents[2]


@pytest.fixture
def start_workers(live_server_env, tmp_path) -> Iterator[Callable[..., list[subprocess.Popen]]]:
    procs: list[subprocess.Popen] = []

    def start(count: int = 1, **extra_env: str) -> list[subprocess.Popen]:
        env = {**live_server_env, "CELERY_BROKER_URL": settings.CELERY_BROKER_URL, **extra_env}
        for n in range(count):
            log = open(tmp_path / f"worker{n}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "leasesite",
                        "worker",
                        "--pool=solo",
                        "--loglevel=INFO",
                        "-Q",
                        settings.CELERY_TASK_DEFAULT_QUEUE,
                        "-n",
                        f"test{n}-{os.getpid()}@%h",
                        "--without-gossip",
                        "--without-mingle",
                    ],
                    cwd=BASE,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        return procs

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    for log in tmp_path.glob("worker*.log"):
        text = log.read_text()
        assert "Traceback" not in text, text
