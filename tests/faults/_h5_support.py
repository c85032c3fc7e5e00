"""Helpers of H5's duplicate-delivery tests (tests/faults/test_duplicates.py): two real workers
behind a start barrier (``_h5_barrier``), their logs, a real local alert receiver, and the
module-wide fake upstreams the workers are pointed at once (so they start once per module)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response

from leasesite.redis_client import get_redis
from tests.faults.processes import celery_worker, stop, wait_for


@dataclass
class Duo:
    """Two solo ``celery worker`` processes; deliveries of the tasks named by ``arm`` wait at a
    barrier until ``release()`` lets them go together."""

    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    key: str = field(default_factory=lambda: f"h5:barrier:{uuid.uuid4().hex[:10]}")
    _offsets: list[int] = field(default_factory=list)

    def start(self, workers: int = 2) -> None:
        barrier = {"H5_BARRIER_KEY": self.key, "H5_BARRIER_REDIS": settings.REDIS_URL}
        for n in range(workers):
            log = self.log_dir / f"h5-worker{n}.log"
            self.logs.append(log)
            self.procs.append(
                celery_worker(
                    {**self.env, **barrier}, log, name=f"h5w{n}", extra_args=("-I", "tests.faults._h5_barrier")
                )
            )
        wait_for(lambda: all("ready." in log.read_text() for log in self.logs), timeout=90, what="workers ready")

    def reset(self, *tasks: str, count: int = 2) -> None:
        """A new test: forget the logs so far, arm the barrier for ``tasks`` (none: disarmed)."""
        redis = get_redis()
        redis.delete(*(f"{self.key}:{part}" for part in ("tasks", "count", "seen", "arrived", "go")))
        if tasks:
            redis.sadd(f"{self.key}:tasks", *tasks)
            redis.set(f"{self.key}:count", count)
        self._offsets = [log.stat().st_size for log in self.logs]

    def arrived(self) -> int:
        return get_redis().llen(f"{self.key}:arrived")

    def release(self, *, expect: int = 2, timeout: float = 60) -> None:
        """Wait until ``expect`` deliveries wait at the barrier, then let them all go at once."""
        wait_for(lambda: self.arrived() >= expect, timeout=timeout, what=f"{expect} deliveries at the barrier")
        get_redis().rpush(f"{self.key}:go", *["go"] * expect)

    def text(self) -> str:
        """What the workers logged since the last ``reset``."""
        parts = []
        for log, offset in zip(self.logs, self._offsets or [0] * len(self.logs), strict=True):
            with open(log, "rb") as handle:
                handle.seek(offset)
                parts.append(handle.read().decode(errors="replace"))
        return "\n".join(parts)

    def succeeded(self, task: str) -> list[str]:
        """The return values the workers logged for ``task`` ("Task NAME[id] succeeded in …: VALUE")."""
        pattern = re.compile(rf"Task {re.escape(task)}\[[^\]]+\] succeeded in [0-9.e-]+s: (.*)")
        return pattern.findall(self.text())

    def wait_succeeded(self, task: str, count: int, *, timeout: float = 60) -> list[str]:
        wait_for(lambda: len(self.succeeded(task)) >= count, timeout=timeout, what=f"{count} × {task} succeeded")
        return self.succeeded(task)

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)
        self.reset()


@dataclass
class AlertSink:
    """A real local HTTP server receiving Apprise's ``json://`` notifications (NOTIFY_URLS)."""

    server: HTTPServer
    alerts: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def notify_url(self) -> str:
        return f"json://127.0.0.1:{self.server.port}/alerts"

    def handle(self, request: Request) -> Response:
        with self._lock:
            self.alerts.append(json.loads(request.get_data() or b"{}"))
        return Response("ok")

    def messages(self) -> list[str]:
        with self._lock:
            return [f"{a.get('title', '')}: {a.get('message', '')}" for a in self.alerts]

    def clear(self) -> None:
        with self._lock:
            self.alerts.clear()


def alert_sink_start() -> AlertSink:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    sink = AlertSink(server)
    server.expect_request("/alerts", method="POST").respond_with_handler(sink.handle)
    return sink


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a worker or beat that must see this session's test database."""
    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "leasesite.settings"
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    env["DATABASE_URL"] = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env.update(extra)
    return env


def recount_seats() -> None:
    """Leases written directly by a set-up bypass the transition function: recount the teams'
    seat counters (``Team.seats_taken``, when this version of the engine keeps one)."""
    try:
        from leases.services.transitions import teams_seats_recount
    except ImportError:
        return
    teams_seats_recount()
