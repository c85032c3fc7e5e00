"""Pieces both benchmarks share: argument types and the real Celery worker processes' life cycle."""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from leasesite.cli import positive_int

WORKER_START_TIMEOUT = 90.0
WORKER_STOP_TIMEOUT = 30.0

__all__ = [
    "WORKER_START_TIMEOUT",
    "WORKER_STOP_TIMEOUT",
    "BenchmarkError",
    "Worker",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "queue_name",
    "stop_workers",
    "wait_until_ready",
]


class BenchmarkError(Exception):
    """The benchmark could not produce figures (not a finding about the code under test)."""


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be finite, got {value!r}")
    return number


def positive_float(value: str) -> float:
    number = _float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = _float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def queue_name(value: str) -> str:
    if not value or not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise argparse.ArgumentTypeError(f"queue names use letters, digits, '-', '_' and '.', got {value!r}")
    return value


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: TextIO
    log_path: Path | None = None


def wait_until_ready(workers: list[Worker]) -> None:
    from leasesite.celery import app

    expected = {worker.name for worker in workers}
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while time.monotonic() < deadline:
        dead = [worker.name for worker in workers if worker.process.poll() is not None]
        if dead:
            raise BenchmarkError(f"worker(s) exited during start-up: {', '.join(dead)}")
        replies = app.control.ping(destination=sorted(expected), timeout=0.5)
        if expected <= {name for reply in replies for name in reply}:
            return
    raise BenchmarkError(f"workers did not answer a ping within {WORKER_START_TIMEOUT:.0f} s")


def stop_workers(workers: list[Worker]) -> None:
    """Warm shutdown (SIGTERM: finish the current task, then exit); SIGKILL only if stuck."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.process.wait(timeout=WORKER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"worker {worker.name} ignored SIGTERM for {WORKER_STOP_TIMEOUT:.0f} s: killing it", file=sys.stderr)
            worker.process.kill()
            worker.process.wait()
        worker.log.close()
