"""Helpers of the token fault tests (families 2, 4, 5, 6): real Celery workers on this test's broker
with short timings, a gate that holds upstream answers, an alert receiver (Apprise ``json://``), a
private ``redis-server`` that can be restarted, and readers of the run's state.

Timings the workers get (env): locks and claims of 10 s, a sweeper grace of 10 s (the minimum the
settings accept), so a killed batch is taken again within seconds, not the production 10 minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import connection
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response

from tests.conftest import ok
from tests.faults import processes
from tokens.models import BaomingToken, RefreshRun, RunKind, TokenCheckRecord

FAST_TIMINGS = {
    "BAOMING_RUN_LOCK_TTL": "10",
    "BAOMING_SWEEP_GRACE_SECONDS": "10",
    "BAOMING_SWEEP_MAX_REDISPATCHES": "3",
}
LIMITER_KEY = "leasesite:ratelimit:baoming"


def database_url() -> str:
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def worker_env(base_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker of this test: its database, upstream, broker, queue, timings."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="leasesite.settings",
        DATABASE_URL=database_url(),
        BAOMING_API_BASE=base_url,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        REDIS_URL=settings.REDIS_URL,
        NOTIFY_URLS="",
        **FAST_TIMINGS,
    )
    env.update(extra)
    return env


# -- the upstream's gate ------------------------------------------------------------------------------
@dataclass
class Gate:
    """Answers that wait until the gate opens (the worker is certainly mid-batch meanwhile)."""

    _open: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, then: Callable[[], Response] = ok) -> Callable[[], Response]:
        def held() -> Response:
            with self._lock:
                self.waiting += 1
            self._open.wait(120)
            return then()

        return held

    def open(self) -> None:
        self._open.set()


# -- workers ------------------------------------------------------------------------------------------
@dataclass
class Workers:
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    started: int = 0

    def start(self, count: int, env: dict[str, str], *, concurrency: int = 1, pool: str = "solo") -> list:
        new = []
        for _ in range(count):
            n = self.started
            self.started += 1
            new.append(
                processes.celery_worker(
                    env, self.log_dir / f"h4-worker{n}.log", name=f"h4w{n}", pool=pool, concurrency=concurrency
                )
            )
        self.procs += new
        return new

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def kill9(self) -> None:
        for proc in self.alive():
            processes.kill9(proc.pid)
        for proc in self.procs:
            proc.wait(timeout=10)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("h4-worker*.log")))

    def succeeded(self, task: str) -> int:
        return len(re.findall(rf"Task {re.escape(task)}\[[^\]]+\] succeeded", self.log_text()))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(name="workers")
def workers_fixture(tmp_path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop_all()


# -- alerts -------------------------------------------------------------------------------------------
class AlertSink:
    """A local HTTP server taking Apprise ``json://`` notifications: one POST per alert sent."""

    def __init__(self) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        self.alerts: list[dict] = []
        self._lock = threading.Lock()
        self.server.expect_request(re.compile(".*"), method="POST").respond_with_handler(self._handle)
        self.server.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.port}/alerts"

    def _handle(self, request: Request) -> Response:
        with self._lock:
            self.alerts.append(json.loads(request.get_data() or b"{}"))
        return Response("{}", status=200, content_type="application/json")

    def titles(self) -> list[str]:
        with self._lock:
            return [a.get("title", "") for a in self.alerts]

    def clear(self) -> None:
        with self._lock:
            self.alerts.clear()

    def stop(self) -> None:
        self.server.clear()
        if self.server.is_running():
            self.server.stop()


@pytest.fixture(name="alert_sink")
def alert_sink_fixture() -> Iterator[AlertSink]:
    sink = AlertSink()
    yield sink
    sink.stop()


# -- runs ---------------------------------------------------------------------------------------------
def latest_run() -> RefreshRun | None:
    return RefreshRun.objects.filter(kind=RunKind.REFRESH).order_by("-id").first()


def wait_run_final(*, after_id: int = 0, timeout: float = 60, tick: Callable[[], None] | None = None) -> RefreshRun:
    """The newest refresh run (newer than ``after_id``) once it is final; ``tick`` runs each poll
    (the sweeper, as beat would run it)."""

    def final() -> RefreshRun | None:
        if tick is not None:
            tick()
        run = RefreshRun.objects.filter(kind=RunKind.REFRESH, pk__gt=after_id).order_by("-id").first()
        return run if run is not None and run.is_final else None

    return processes.wait_for(final, timeout=timeout, interval=0.2, what="a final refresh run")  # type: ignore[return-value]


def make_tokens(count: int, prefix: str = "") -> list[BaomingToken]:
    """``count`` stored tokens (bulk: the fingerprint and ciphertext are computed on save)."""
    import secrets

    rows = [
        BaomingToken(card_name=f"名片{prefix}{n}", user_name=f"user{prefix}{n}", token=secrets.token_hex(16))
        for n in range(count)
    ]
    BaomingToken.objects.bulk_create(rows, batch_size=500)
    return list(BaomingToken.objects.filter(card_name__startswith=f"名片{prefix}").order_by("id"))


def fingerprints() -> set[str]:
    return set(BaomingToken.objects.values_list("fingerprint", flat=True))


def recorded_checks(run_id: int) -> dict[int, int]:
    """How many checks of each token a run recorded (its history rows)."""
    counts: dict[int, int] = {}
    for token_id in TokenCheckRecord.objects.filter(run_id=run_id).values_list("token_pk", flat=True):
        counts[token_id] = counts.get(token_id, 0) + 1
    return counts


def limiter_pause_seconds(client: redis.Redis, key: str = LIMITER_KEY) -> float:
    """How far ahead of now (Redis' clock) the shared limiter's next free slot is."""
    tat = client.get(key)
    if tat is None:
        return 0.0
    seconds, micros = client.time()
    return (int(float(tat)) - (seconds * 1_000_000 + micros)) / 1_000_000


# -- a private redis-server ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """``redis-server`` on a free port with nothing persisted: a restart loses every key."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def start(self) -> None:
        log = open(self.log_dir / f"redis-{self.port}.log", "a")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        processes.wait_for(self._pings, timeout=10, what=f"redis-server on {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def shutdown(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client().shutdown(nosave=True)
        assert self.proc is not None
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.shutdown()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.shutdown()


@pytest.fixture(name="private_redis")
def private_redis_fixture(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


def send_task(name: str, *, broker_url: str, kwargs: dict | None = None) -> None:
    """Send a task to another broker than this process' (a private Redis)."""
    from leasesite.celery import app

    with app.connection_for_write(broker_url) as conn:
        app.send_task(name, kwargs=kwargs or {}, connection=conn, queue=settings.CELERY_TASK_DEFAULT_QUEUE)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
