"""Helpers of the lease fault tests (families 1, 6 and 7): a team provider whose calls can be held
at a gate, real Celery workers on this test's broker, an alert receiver, and checks of where every
member sits at the provider.

The provider here is the shared fake (``leasesite.fakes.team_provider_server``) with one extra
fault control, kept in this module so the shared server stays as it is: **gates**. A gate matches
requests by method, team and path; matching requests wait at the gate (already recorded by the
gate, not yet by the fake) until it opens, then act — or, with ``discard``, answer 503 without
acting (the caller died before the provider did anything). ``limit`` holds only the first N
matching requests: later ones pass, so a second worker can get through while the first is stuck.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from subprocess import Popen
from urllib.parse import unquote, urlsplit

import pytest
from django.db import connection
from django.utils import timezone
from pytest_httpserver import HTTPServer

from leases.models import LeaseAction, LeaseStatus, MemberLease, Team
from leases.providers.base import ProviderError
from leasesite.fakes.background import BackgroundServer
from leasesite.fakes.team_provider_server import FakeProviderState, make_handler
from tests.faults import processes
from tests.lease_fixtures import TEAM_TOKEN


# -- the provider with gates --------------------------------------------------------------------------
@dataclass
class Gate:
    method: str
    team: str | None = None
    path: str | None = None  # prefix of the path below the team: "invites", "members/", "members"
    limit: int | None = None  # hold only the first ``limit`` matching requests
    discard: bool = False  # once open, held requests answer 503 and do nothing
    held: list[str] = field(default_factory=list)  # "team METHOD path" of every request held
    _open: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def matches(self, team: str, method: str, rest: str) -> bool:
        return (
            method == self.method
            and (self.team is None or team == self.team)
            and (self.path is None or rest.startswith(self.path))
        )

    def take(self, team: str, method: str, rest: str) -> bool:
        """Count a matching request in; True if it must wait."""
        with self._lock:
            if self._open.is_set() or (self.limit is not None and len(self.held) >= self.limit):
                return False
            self.held.append(f"{team} {method} {rest}")
            return True

    def arrivals(self) -> int:
        with self._lock:
            return len(self.held)

    def wait(self) -> None:
        while not self._open.wait(0.02):
            pass

    def open(self) -> None:
        self._open.set()


class GatedProviderState(FakeProviderState):
    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.gates: list[Gate] = []

    def gate(self, method: str, **options: object) -> Gate:
        gate = Gate(method, **options)  # type: ignore[arg-type]
        with self._lock:
            self.gates.append(gate)
        return gate

    def open_all(self) -> None:
        with self._lock:
            gates = list(self.gates)
        for gate in gates:
            gate.open()

    def die(self, team: str, status: int = 402) -> None:
        """From now on every contract call to ``team`` answers ``status`` (402: workspace
        deactivated, 401: credentials revoked)."""
        fake = self.team(team)
        with fake.lock:
            fake.fail_next[:] = [ProviderError(f"HTTP {status} (team {team} died)", status=status)] * 100_000

    def posts(self, team: str, email: str) -> int:
        """POST invites for ``email`` the fake team received (duplicates included)."""
        return self.team(team).invite_posts.count(email.lower())

    def deletes(self, team: str) -> list[str]:
        with self._lock:
            return [p for t, m, p in self.requests if t == team and m == "DELETE"]


def _gated_handler(state: GatedProviderState) -> type:
    base = make_handler(state)

    class Handler(base):  # type: ignore[misc, valid-type]
        def _route(self, method: str) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if len(parts) >= 3 and parts[0] == "teams":
                team, rest = parts[1], "/".join(parts[2:])
                with state._lock:
                    gates = [g for g in state.gates if g.matches(team, method, rest)]
                for gate in gates:
                    if gate.take(team, method, rest):
                        gate.wait()
                        if gate.discard:
                            if method == "POST":
                                self._body()
                            self._send(503, {"error": "discarded at the gate"})
                            return
            super()._route(method)

    return Handler


def _quiet_on_reset(request: object, client_address: object) -> None:
    """A killed worker resets its connections: not an error of the fake."""
    import sys
    import traceback

    if not isinstance(sys.exc_info()[1], ConnectionError):
        traceback.print_exc()


class GatedProviderServer(BackgroundServer):
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **state_options: object) -> None:
        self.state = GatedProviderState(**state_options)
        super().__init__(_gated_handler(self.state), host=host, port=port)
        self.httpd.handle_error = _quiet_on_reset  # type: ignore[method-assign]

    def team_url(self, name: str) -> str:
        return f"{self.url}/teams/{name}/"

    def stop(self) -> None:
        self.state.open_all()  # a held request must not keep shutdown waiting
        super().stop()


@pytest.fixture
def provider() -> Iterator[GatedProviderServer]:
    """Overrides tests/lease_fixtures.py's ``provider`` in the modules that import it: the same
    fake (``make_team`` points teams at it), with gates."""
    with GatedProviderServer(token=TEAM_TOKEN) as server:
        yield server


# -- alerts --------------------------------------------------------------------------------------------
class AlertReceiver:
    """A real HTTP endpoint for Apprise's ``json://`` target: every alert a worker sends lands here."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server

    @property
    def notify_url(self) -> str:
        return f"json://127.0.0.1:{self.server.port}/alerts"

    def titles(self) -> list[str]:
        return [json.loads(request.data).get("title", "") for request, _response in self.server.log]


@pytest.fixture
def alerts() -> Iterator[AlertReceiver]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    server.expect_request("/alerts", method="POST").respond_with_data("ok")
    yield AlertReceiver(server)
    server.clear()
    server.stop()


# -- workers -------------------------------------------------------------------------------------------
class Workers:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Popen] = []
        self.logs: list[Path] = []

    def start(self, *, pool: str = "prefork", concurrency: int = 1, wait: bool = True, **env: str) -> Popen:
        n = len(self.procs)
        log = self.log_dir / f"h3-worker{n}.log"
        proc = processes.celery_worker({**self.env, **env}, log, name=f"h3w{n}", pool=pool, concurrency=concurrency)
        self.procs.append(proc)
        self.logs.append(log)
        if wait:
            processes.wait_for(
                lambda: proc.poll() is not None or " ready." in log.read_text(), timeout=60, what="worker ready"
            )
            assert proc.poll() is None, self.log(n)
            if pool == "prefork":
                processes.wait_for(
                    lambda: len(processes.child_pids(proc.pid)) >= concurrency, timeout=30, what="pool children"
                )
        return proc

    def log(self, n: int) -> str:
        return self.logs[n].read_text()

    def all_logs(self) -> str:
        return "\n".join(f"--- worker {n} ---\n{log.read_text()}" for n, log in enumerate(self.logs))

    def stop_all(self) -> None:
        """The test has made its checks: no warm shutdown to wait for (it takes seconds)."""
        for proc in self.procs:
            for pid in [*processes.child_pids(proc.pid), proc.pid]:
                with contextlib.suppress(OSError):
                    _cont(pid)
                processes.kill9(pid)
            proc.wait(10)


def _cont(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def purge_queue() -> None:
    """Drop messages left in this test's queue (a run_transfers redelivered after a kill)."""
    from leasesite.celery import app

    with app.connection_for_write() as conn:
        app.amqp.queues[app.conf.task_default_queue].bind(conn.default_channel).purge()


@pytest.fixture
def workers(live_server_env: dict[str, str], tmp_path: Path, alerts: AlertReceiver) -> Iterator[Workers]:
    """Real Celery workers (prefork by default) on this test's broker, queue and database; short
    claims and timeouts so a test sees a recovery in seconds; alerts go to ``alerts``."""
    env = {
        **live_server_env,
        "LEASE_CLAIM_TTL": "10",  # the smallest the settings accept
        "LEASE_PROVIDER_TIMEOUT": "30",  # a request held at a gate must not time out
        "LEASE_PROVIDER_RATE_LIMIT": "1000",
        "LEASE_TRANSFER_BACKOFF_SECONDS": "0",
        "NOTIFY_URLS": alerts.notify_url,
    }
    purge_queue()
    crew = Workers(env, tmp_path)
    yield crew
    crew.stop_all()
    purge_queue()


# -- the database --------------------------------------------------------------------------------------
def other_backends() -> list[int]:
    """PostgreSQL backends of this test database other than this process's own connection: the
    workers' connections."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        )
        return [row[0] for row in cursor.fetchall()]


def terminate_backends(pids: list[int]) -> int:
    with connection.cursor() as cursor:
        killed = 0
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
            killed += bool(cursor.fetchone()[0])
        return killed


# -- leases and where their members are ---------------------------------------------------------------
def due_lease(make_lease: Callable[..., MemberLease], provider: GatedProviderServer, team: Team, **kwargs: object):
    """An active lease seated at the provider whose term ended a minute ago."""
    now = timezone.now()
    kwargs.setdefault("joined_at", now - timedelta(days=31))
    kwargs.setdefault("expires_at", now - timedelta(minutes=1))
    lease = make_lease(team, LeaseStatus.ACTIVE, **kwargs)
    member_id = provider.state.team(team.name).add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    recount_seats()
    lease.refresh_from_db()
    return lease


def recount_seats() -> None:
    """Leases written directly by a set-up bypass the transition function: recount the teams'
    seat counters (``Team.seats_taken``, when this version of the engine keeps one)."""
    try:
        from leases.services.transitions import teams_seats_recount
    except ImportError:
        return
    teams_seats_recount()


def seats_of(provider: GatedProviderServer, email: str, teams: list[Team]) -> list[str]:
    """The teams where ``email`` is a member or invited, at the provider."""
    email = email.lower()
    return [
        t.name
        for t in teams
        if email in provider.state.team(t.name).member_emails() or email in provider.state.team(t.name).invited_emails()
    ]


def assert_capacity_respected(provider: GatedProviderServer, teams: list[Team]) -> None:
    for team in teams:
        fake = provider.state.team(team.name)
        seated = len(fake.member_emails() | fake.invited_emails())
        assert seated <= team.capacity, f"{team.name}: {seated} seats taken at the provider, capacity {team.capacity}"
        held = (
            MemberLease.objects.filter(team=team)
            .exclude(status__in=(LeaseStatus.CANCELLED, LeaseStatus.EXPIRED))
            .count()
        )
        assert held <= team.capacity, f"{team.name}: {held} open leases, capacity {team.capacity}"


def actions(lease: MemberLease) -> list[str]:
    return [a for a in lease.events.order_by("id").values_list("action", flat=True) if a != LeaseAction.NOTE]


def send_run_transfers() -> None:
    from leases.tasks import run_transfers

    run_transfers.delay()


def claims_lapsed(lease_ids: list[int]) -> bool:
    now = timezone.now()
    return not MemberLease.objects.filter(pk__in=lease_ids, claimed_until__gte=now).exists()
