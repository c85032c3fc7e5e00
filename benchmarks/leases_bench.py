#!/usr/bin/env python
"""Benchmark the seat-lease engine against the fake team provider: one join sync, then transfers.

Starts ``FakeProviderServer`` (``--latency`` per answer) in this process, seeds ``--teams`` teams
(provider ``http``) into the bench database (deleting every team, lease, lease event and
redemption code there first), then measures:

1. **join sync**: ``--leases`` pending leases per team, every second one already a member at the
   provider (it gets activated), the others invited; ``joins_sync()`` once, in this process.
   Provider HTTP calls against the goal (two paged listings per team), database queries per team
   (again with ``--small-leases`` per team, to show the count does not grow with the leases) and
   wall time.
2. **transfers**: ``--transfers`` due active leases spread over the teams; ``--workers`` real
   ``celery worker --pool=solo`` processes each run one ``leases.run_transfers`` task (they claim
   from the same pool of due leases, with ``LEASE_TRANSFER_CONCURRENCY`` threads each) until no
   lease is active or transferring. Then the same transfers in one worker process with
   ``LEASE_TRANSFER_CONCURRENCY=1`` for comparison (``--no-compare`` skips it). Checked: every
   lease has exactly one ``transferred`` event and every email got exactly one invite POST.

It prints labelled figures and, last, a one-line JSON summary. Exit status: 0 done, 1 a
correctness check failed, 2 bad arguments, 3 the benchmark could not run.

Example: ``python benchmarks/leases_bench.py`` (10 teams x 1,000 leases) or ``--quick``.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))  # run as a script from anywhere: make the project importable

from benchmarks.common import (  # noqa: E402 - after the sys.path set-up above
    BenchmarkError,
    Worker,
    non_negative_float,
    positive_int,
    queue_name,
    stop_workers,
    wait_until_ready,
)

if TYPE_CHECKING:
    from leasesite.fakes.team_provider_server import FakeProviderServer

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_BENCH_FAILED = 0, 1, 2, 3
POLL_SECONDS = 0.1
TEAM_TOKEN = "bench-team-token"  # the fake provider is started without a token check
EMAIL_DOMAIN = "bench.example"

# Its own services: the refresh benchmark uses leasesite_bench and Redis dbs 3/4.
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/leasesite_bench_leases"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/6"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
DEFAULT_QUEUE = "leasesite-leases-bench"
RAISED = re.compile(r"Task leases\.run_transfers\[(?P<id>[^\]]+)\] raised")
SUCCEEDED = re.compile(r"Task leases\.run_transfers\[(?P<id>[^\]]+)\] succeeded in (?P<secs>[\d.]+)s: (?P<out>\{.*\})")


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


# --- arguments --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time a join sync and lease transfers against a fake provider.")
    add = parser.add_argument
    add("--teams", type=positive_int, default=10, help="teams (default: %(default)s)")
    add("--leases", type=positive_int, default=1000, help="pending leases per team in the join sync (default: 1000)")
    add(
        "--small-leases",
        type=positive_int,
        default=100,
        help="leases per team of the second join sync, to compare query counts (default: %(default)s)",
    )
    add("--transfers", type=positive_int, default=1000, help="due leases to transfer, all teams (default: 1000)")
    add("--capacity", type=positive_int, default=2000, help="seats per team (default: %(default)s)")
    add("--latency", type=non_negative_float, default=0.02, help="seconds per fake answer (default: %(default)s)")
    add("--workers", type=positive_int, default=2, help="celery worker processes for transfers (default: 2)")
    add(
        "--other-leases",
        type=non_negative_int,
        default=0,
        help="extra lease rows (mixed statuses, none due) in the table during the transfers (default: 0)",
    )
    add(
        "--concurrency",
        type=positive_int,
        default=None,
        help="LEASE_TRANSFER_CONCURRENCY of those workers (default: the project's setting)",
    )
    add(
        "--page-size",
        type=positive_int,
        default=None,
        help="LEASE_PROVIDER_PAGE_SIZE (default: the project's setting; the fake caps pages at 500)",
    )
    add("--no-compare", action="store_true", help="skip the 1 process x LEASE_TRANSFER_CONCURRENCY=1 run")
    add("--only", choices=("sync", "transfers"), default=None, help="run one part only")
    add("--quick", action="store_true", help="a fast check: 2 teams x 100 leases, 10 for the small sync, 100 transfers")
    add("--timeout", type=non_negative_float, default=600.0, help="seconds to wait for one transfer run (default: 600)")
    add(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="bench database, created if missing; ALL its teams and leases are deleted (default: %(default)s)",
    )
    add("--sqlite", action="store_true", help="use a fresh SQLite file in a temporary folder instead of PostgreSQL")
    add("--redis-url", default=DEFAULT_REDIS_URL, help="REDIS_URL (default: %(default)s)")
    add("--broker-url", default=DEFAULT_BROKER_URL, help="CELERY_BROKER_URL (default: %(default)s)")
    add("--queue", type=queue_name, default=DEFAULT_QUEUE, help="CELERY_TASK_DEFAULT_QUEUE (default: %(default)s)")
    add("--keep-logs", action="store_true", help="keep the run and worker logs (their folder is printed)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.teams, args.leases, args.small_leases, args.transfers = 2, 100, 10, 100
    if args.teams < 2 and args.only != "sync":
        parser.error("transfers need at least 2 teams")
    if not args.sqlite:
        database = urlsplit(args.database_url)
        if database.scheme not in ("postgres", "postgresql", "pgsql"):
            parser.error("--database-url must be a PostgreSQL URL (or use --sqlite)")
        if "bench" not in database.path.lstrip("/"):
            parser.error("--database-url must name a database whose name contains 'bench': its leases are deleted")
    for option, url in (("--redis-url", args.redis_url), ("--broker-url", args.broker_url)):
        if urlsplit(url).scheme not in ("redis", "rediss"):
            parser.error(f"{option} must be a redis:// URL")
    if args.redis_url == args.broker_url:
        parser.error("--redis-url and --broker-url must be different Redis databases")
    seats_needed = math.ceil(args.transfers / args.teams) + math.ceil(args.transfers / (args.teams - 1 or 1))
    if args.only != "sync" and args.capacity < seats_needed:
        parser.error(f"--capacity {args.capacity} is too small for {args.transfers} transfers over {args.teams} teams")
    if args.only != "transfers" and args.capacity < args.leases:
        parser.error("--capacity must hold --leases")
    return args


# --- environment and database -----------------------------------------------------------------


def configure_environment(args: argparse.Namespace, log_dir: Path) -> None:
    """Settings come from the environment; worker subprocesses inherit the same one (same key)."""
    if not os.environ.get("TOKEN_ENCRYPTION_KEYS"):
        from cryptography.fernet import Fernet

        os.environ["TOKEN_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    if not os.environ.get("DJANGO_SECRET_KEY"):
        os.environ["DJANGO_SECRET_KEY"] = secrets.token_urlsafe(48)
    database_url = f"sqlite:///{log_dir / 'bench.sqlite3'}" if args.sqlite else args.database_url
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "leasesite.settings",
            "DJANGO_DEBUG": "false",  # production-like; CaptureQueriesContext still sees queries
            "DATABASE_URL": database_url,
            "REDIS_URL": args.redis_url,
            "CELERY_BROKER_URL": args.broker_url,
            "CELERY_TASK_DEFAULT_QUEUE": args.queue,
            "CELERY_TASK_ALWAYS_EAGER": "false",
            "NOTIFY_URLS": "",
        }
    )
    # The fake provider is local: the shared per-host limit (5/s by default) would measure the
    # limiter, not the engine. Set LEASE_PROVIDER_RATE_LIMIT to measure with a real limit.
    os.environ.setdefault("LEASE_PROVIDER_RATE_LIMIT", "100000")
    if args.page_size is not None:
        os.environ["LEASE_PROVIDER_PAGE_SIZE"] = str(args.page_size)
    if args.concurrency is not None:
        os.environ["LEASE_TRANSFER_CONCURRENCY"] = str(args.concurrency)


def ensure_database(args: argparse.Namespace) -> None:
    """Create the bench database if it is missing (PostgreSQL, through the maintenance database)."""
    if args.sqlite:
        return
    import psycopg
    from psycopg import sql

    url = urlsplit(args.database_url)
    name = url.path.lstrip("/")
    maintenance = url._replace(scheme="postgresql", path="/postgres").geturl()
    with psycopg.connect(maintenance, autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def setup_django(log_path: Path) -> None:
    import django

    django.setup()
    # The services log every team and every lease; that goes to a file, not to the figures.
    from leasesite.log_filters import SecretScrubFilter

    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(SecretScrubFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def reset_leases(server: FakeProviderServer) -> None:
    """No team, lease, event, code or lease lock in the database; no team at the fake provider."""
    from django.db import connection

    from leases.models import LeaseEvent, MemberLease, RedemptionCode, Team
    from leasesite.models import JobLock

    with connection.cursor() as cursor:
        # Raw SQL: teams of an earlier invocation may be encrypted with another key, never load them.
        # On PostgreSQL events are append-only (a trigger refuses DELETE); TRUNCATE is the
        # benchmark's reset, not a change of history.
        tables = [connection.ops.quote_name(m._meta.db_table) for m in (RedemptionCode, LeaseEvent, MemberLease, Team)]
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE {', '.join(tables)}, leases_teamevent CASCADE")
        else:
            for table in [*tables[:3], "leases_teamevent", tables[3]]:
                cursor.execute(f"DELETE FROM {table}")
    JobLock.objects.filter(name__startswith="leases:").delete()
    with server.state._lock:
        server.state.teams.clear()
        server.state.requests.clear()


def create_teams(server: FakeProviderServer, count: int, capacity: int) -> list:
    from leases.models import Team

    teams = [
        Team.objects.create(
            name=f"bench-{index:02d}",
            provider="http",
            api_base=server.team_url(f"bench-{index:02d}"),
            api_token=TEAM_TOKEN,
            capacity=capacity,
        )
        for index in range(count)
    ]
    for team in teams:
        server.state.team(team.name)
    return teams


def reset_broker(args: argparse.Namespace) -> None:
    """No task left in our own queue from an interrupted earlier run (other queues are left alone)."""
    import redis

    broker = redis.Redis.from_url(args.broker_url)
    try:
        stale = list(broker.scan_iter(match=f"{args.queue}*"))
        if stale:
            broker.delete(*stale)
    finally:
        broker.close()


def cpu_sample() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (0, 0 where unavailable)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def cpu_busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Machine-wide CPU use between two samples, in percent of all cores (other processes count too)."""
    total = after[1] - before[1]
    return None if total <= 0 else 100.0 * (after[0] - before[0]) / total


# --- 1. join sync ---------------------------------------------------------------------------------


@dataclass
class SyncFigures:
    leases_per_team: int
    teams: int
    seconds: float
    calls_total: int
    calls_per_team: list[int]
    calls_goal: int
    members_listed: int
    invites_listed: int
    queries: int
    query_kinds: dict[str, int]
    joined: int
    expected_joined: int
    cpu_busy: float | None
    failures: list[str]

    @property
    def queries_per_team(self) -> float:
        return self.queries / self.teams

    def as_dict(self) -> dict[str, Any]:
        return {
            "leases_per_team": self.leases_per_team,
            "seconds": round(self.seconds, 3),
            "calls": self.calls_total,
            "calls_per_team": max(self.calls_per_team, default=0),
            "calls_goal": self.calls_goal,
            "queries": self.queries,
            "queries_per_team": round(self.queries_per_team, 2),
            "joined": self.joined,
            "cpu_busy_percent": None if self.cpu_busy is None else round(self.cpu_busy),
            "ok": not self.failures,
        }


@contextmanager
def counting_queries() -> Iterator[list[str]]:
    """Every SQL statement run while inside, on any thread's connection (the join sync runs teams
    on pool threads, each with its own connection, which ``CaptureQueriesContext`` cannot see).
    Connections already open are closed first, so every one is opened, and counted, inside."""
    import threading

    from django.db import connections
    from django.db.backends.signals import connection_created

    captured: list[str] = []
    lock = threading.Lock()
    active = True

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: dict) -> Any:
        if active:
            with lock:
                captured.append(sql)
        return execute(sql, params, many, context)

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.execute_wrappers.append(wrapper)

    connections.close_all()
    connection_created.connect(on_created, weak=False)
    try:
        yield captured
    finally:
        active = False
        connection_created.disconnect(on_created)
        connections.close_all()


def seed_sync(server: FakeProviderServer, teams: list, leases_per_team: int) -> int:
    """Pending leases, all invited by us; every second one already joined at the provider, the
    others still invited there. Returns how many should be activated."""
    from django.utils import timezone

    from leases.models import LeaseStatus, MemberLease

    now = timezone.now()
    first_join = datetime.now(UTC) - timedelta(days=1)
    rows, expected = [], 0
    for team in teams:
        fake = server.state.team(team.name)
        for index in range(leases_per_team):
            email = f"{team.name}-{index:05d}@{EMAIL_DOMAIN}"
            rows.append(
                MemberLease(
                    email=email,
                    team=team,
                    term_months=1,
                    status=LeaseStatus.PENDING,
                    invited_at=now - timedelta(days=1),
                )
            )
            if index % 2 == 0:
                # Everyone joined at another moment, as in life (the activation writes per-lease values).
                fake.add_member(email, joined_at=first_join + timedelta(seconds=index))
                expected += 1
            else:
                fake.invite(email)
    MemberLease.objects.bulk_create(rows, batch_size=1000)
    recount_seats()
    return expected


def recount_seats() -> None:
    """Bulk-created leases bypass the transition function: set the teams' seat counters."""
    from leases.services.transitions import teams_seats_recount

    teams_seats_recount()


def run_sync(server: FakeProviderServer, teams_count: int, capacity: int, leases_per_team: int) -> SyncFigures:
    from django.conf import settings
    from django.db import connection

    from leases.models import LeaseStatus, MemberLease
    from leases.services.sync import joins_sync

    reset_leases(server)
    teams = create_teams(server, teams_count, capacity)
    expected = seed_sync(server, teams, leases_per_team)
    page = settings.LEASE_PROVIDER_PAGE_SIZE
    listed = {
        team.name: (len(server.state.team(team.name).members), len(server.state.team(team.name).invites))
        for team in teams
    }
    # An empty listing still costs one request.
    goal = sum(max(1, math.ceil(m / page)) + max(1, math.ceil(i / page)) for m, i in listed.values())
    connection.close()  # the sync opens its own connection, as a fresh worker would
    with server.state._lock:
        server.state.requests.clear()

    with counting_queries() as captured:
        cpu_before = cpu_sample()
        started = time.perf_counter()
        results = joins_sync()
        seconds = time.perf_counter() - started
        cpu_busy = cpu_busy_percent(cpu_before, cpu_sample())

    kinds = Counter(sql.split(None, 1)[0].upper() for sql in captured)
    calls = [server.state.calls(team=team.name) for team in teams]
    failures = [f"team {r.team}: {r.error or r.skipped}" for r in results if not r.ok]
    for result, count in zip(results, calls, strict=False):
        if result.provider_calls != count:
            failures.append(f"team {result.team}: counted {result.provider_calls} calls, the server saw {count}")
    non_get = server.state.calls() - server.state.calls(method="GET")
    if non_get:
        failures.append(f"{non_get} provider calls other than GET (invites or removals) during the sync")
    members = {m.email: m for team in teams for m in server.state.team(team.name).members.values()}
    active = wrong = 0
    for email, joined_at, member_id in MemberLease.objects.filter(status=LeaseStatus.ACTIVE).values_list(
        "email", "joined_at", "provider_member_id"
    ):
        active += 1
        member = members.get(email)
        wrong += member is None or (member.id, member.joined_at) != (member_id, joined_at)
    if active != expected:
        failures.append(f"{active} leases active after the sync, expected {expected}")
    if wrong:
        failures.append(f"{wrong} active leases whose member id or joined_at differ from the provider's")
    return SyncFigures(
        leases_per_team=leases_per_team,
        teams=teams_count,
        seconds=seconds,
        calls_total=sum(calls),
        calls_per_team=calls,
        calls_goal=goal,
        members_listed=sum(m for m, _ in listed.values()),
        invites_listed=sum(i for _, i in listed.values()),
        queries=len(captured),
        query_kinds=dict(kinds.most_common()),
        joined=sum(r.joined for r in results),
        expected_joined=expected,
        cpu_busy=cpu_busy,
        failures=failures,
    )


def report_sync(big: SyncFigures, small: SyncFigures | None, latency: float) -> None:
    from django.conf import settings

    page = settings.LEASE_PROVIDER_PAGE_SIZE
    rows: list[tuple[str, str]] = [("page size", f"{page} (LEASE_PROVIDER_PAGE_SIZE)")]
    for figures in (big, small):
        if figures is None:
            continue
        tag = f"[{figures.teams} teams x {figures.leases_per_team} leases]"
        per_team = sorted(set(figures.calls_per_team))
        members_pages = math.ceil(figures.members_listed / figures.teams / page)
        invites_pages = math.ceil(figures.invites_listed / figures.teams / page)
        rows += [
            (f"sync {tag}", f"joined {figures.joined} of {figures.expected_joined} expected"),
            (
                "  wall time",
                f"{figures.seconds:.2f} s  (provider latency alone: {figures.calls_total * latency:.2f} s; "
                f"machine CPU busy {busy_text(figures.cpu_busy)})",
            ),
            (
                "  provider calls",
                f"{figures.calls_total} total, per team {'/'.join(map(str, per_team))}; goal {figures.calls_goal} = "
                f"{figures.teams} teams x ({members_pages} member pages + {invites_pages} invite pages)"
                f" -> {'MET' if figures.calls_total <= figures.calls_goal else 'MISSED'}",
            ),
            (
                "  db queries",
                f"{figures.queries} total, {figures.queries_per_team:.1f} per team "
                f"(= 1 team list + {(figures.queries - 1) / figures.teams:g} per team)  "
                f"({', '.join(f'{k} {v}' for k, v in figures.query_kinds.items())})",
            ),
        ]
        for failure in figures.failures:
            rows.append(("  CHECK FAILED", failure))
    if small is not None:
        grows = abs(big.queries_per_team - small.queries_per_team) > 1e-9
        rows.append(
            (
                "queries per team",
                f"{small.leases_per_team} leases: {small.queries_per_team:.1f}, {big.leases_per_team} leases: "
                f"{big.queries_per_team:.1f} -> {'GROWS with the leases' if grows else 'constant'}",
            )
        )
    print_rows("join sync", rows)


# --- 2. transfers -----------------------------------------------------------------------------------


@dataclass
class TransferFigures:
    label: str
    workers: int
    concurrency: int
    batch_size: int
    transfers: int
    seconds: float
    processing_seconds: float
    invite_posts: int
    deletes: int
    per_worker: list[dict[str, Any]]
    cpu_busy: float | None
    failures: list[str]

    @property
    def per_second(self) -> float:
        return self.transfers / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "transfers": self.transfers,
            "seconds": round(self.seconds, 3),
            "transfers_per_s": round(self.per_second, 2),
            "processing_seconds": round(self.processing_seconds, 3),
            "cpu_busy_percent": None if self.cpu_busy is None else round(self.cpu_busy),
            "ok": not self.failures,
        }


def seed_transfers(server: FakeProviderServer, teams: list, count: int) -> dict[int, tuple[str, str]]:
    """Due active leases spread round-robin over the teams, each a member of its team at the
    provider. Returns lease id -> (email, old team name)."""
    from django.utils import timezone

    from leases.models import LeaseStatus, MemberLease

    now = timezone.now()
    joined_at = now - timedelta(days=40)
    rows = []
    for index in range(count):
        team = teams[index % len(teams)]
        email = f"move-{index:05d}@{EMAIL_DOMAIN}"
        member_id = server.state.team(team.name).add_member(email, joined_at=joined_at)
        rows.append(
            MemberLease(
                email=email,
                team=team,
                term_months=1,
                status=LeaseStatus.ACTIVE,
                invited_at=joined_at - timedelta(hours=1),
                joined_at=joined_at,
                expires_at=now - timedelta(minutes=1),
                provider_member_id=member_id,
            )
        )
    created = MemberLease.objects.bulk_create(rows, batch_size=1000)
    recount_seats()
    teams_by_id = {team.pk: team.name for team in teams}
    ids = [lease.pk for lease in created]
    return {
        pk: (email, teams_by_id[team_id])
        for pk, email, team_id in MemberLease.objects.filter(pk__in=ids).values_list("pk", "email", "team_id")
    }


# Statuses of the "other" leases: none due for a transfer, none waiting (nothing for the run to do).
OTHER_MIX = (("expired", 4), ("cancelled", 2), ("active", 3), ("pending", 1))


def other_leases_per_team(count: int, teams: int) -> int:
    """Seats the open ones among ``count`` other leases hold in each team (rounded up)."""
    open_share = sum(n for status, n in OTHER_MIX if status in ("active", "pending")) / sum(n for _, n in OTHER_MIX)
    return math.ceil(count * open_share / teams) + 1


def seed_other_leases(teams: list, count: int) -> None:
    """``count`` lease rows of mixed statuses spread over the teams, bulk-created: the table the
    claim and seat queries run on is this big; none of them is due, so the run ignores them."""
    from django.utils import timezone

    from leases.models import MemberLease

    if not count:
        return
    now = timezone.now()
    cycle = [status for status, n in OTHER_MIX for _ in range(n)]
    ends = now + timedelta(days=20)
    rows = []
    for index in range(count):
        team = teams[index % len(teams)]
        status = cycle[(index // len(teams)) % len(cycle)]  # every team gets the whole mix
        joined = status != "pending"
        rows.append(
            MemberLease(
                email=f"other-{index:06d}@{EMAIL_DOMAIN}",
                team=team,
                term_months=1,
                status=status,
                invited_at=now - timedelta(days=60),
                joined_at=now - timedelta(days=50) if joined else None,
                expires_at=ends if status == "active" else (now - timedelta(days=20) if joined else None),
                created_at=now - timedelta(days=60, seconds=index),
            )
        )
    MemberLease.objects.bulk_create(rows, batch_size=2000)


def connection_vendor() -> str:
    from django.db import connection

    return connection.vendor


def analyze_tables() -> None:
    """Fresh planner statistics after a bulk seed (autovacuum would get there a little later)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE leases_memberlease, leases_team, leases_leaseevent")


def start_workers(count: int, concurrency: int, args: argparse.Namespace, log_dir: Path, tag: str) -> list[Worker]:
    env = {**os.environ, "LEASE_TRANSFER_CONCURRENCY": str(concurrency)}
    workers = []
    for index in range(count):
        name = f"leases-{tag}-{index + 1}-{os.getpid()}@localhost"
        log_path = log_dir / f"worker-{tag}-{index + 1}.log"
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop_workers
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "leasesite",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "-Q",
            args.queue,
            "-n",
            name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=INFO",
        ]
        process = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
        workers.append(Worker(name, process, log, log_path))
    return workers


@contextmanager
def running_workers(count: int, concurrency: int, args: argparse.Namespace, log_dir: Path, tag: str) -> Iterator:
    workers = start_workers(count, concurrency, args, log_dir, tag)
    try:
        wait_until_ready(workers)
        yield workers
    finally:
        stop_workers(workers)


def finished_tasks(workers: list[Worker]) -> dict[str, dict[str, Any]]:
    """Task id -> {worker, seconds, summary} for every run_transfers a worker logged as done
    (BenchmarkError when one raised)."""
    done = {}
    for worker in workers:
        worker.log.flush()
        for line in worker.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if RAISED.search(line):
                raise BenchmarkError(f"{worker.name}: {line.strip()[:300]}")
            match = SUCCEEDED.search(line)
            if match:
                try:
                    summary = ast.literal_eval(match["out"])
                except (ValueError, SyntaxError):
                    summary = {}
                done[match["id"]] = {"worker": worker.name, "seconds": float(match["secs"]), "summary": summary}
    return done


def wait_for_transfers(workers: list[Worker], task_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Until no lease is active or transferring (or every task ended with some left over)."""
    from django.db import close_old_connections

    from leases.models import LeaseStatus, MemberLease

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [worker.name for worker in workers if worker.process.poll() is not None]
        if dead:
            raise BenchmarkError(f"worker(s) exited during the run: {', '.join(dead)}")
        left = MemberLease.objects.filter(status__in=(LeaseStatus.ACTIVE, LeaseStatus.TRANSFERRING)).count()
        done = finished_tasks(workers)
        if left == 0 or set(task_ids) <= set(done):
            # Tasks log "succeeded" a moment after the last lease is written: wait for the lines.
            while not set(task_ids) <= set(done) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
                done = finished_tasks(workers)
            return done
        time.sleep(POLL_SECONDS)
        close_old_connections()
    raise BenchmarkError(f"the transfers did not end within {timeout:.0f} s (see the worker logs)")


def check_transfers(server: FakeProviderServer, seeded: dict[int, tuple[str, str]], capacity: int) -> list[str]:
    from django.db.models import Count

    from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease

    failures: list[str] = []
    statuses = Counter(MemberLease.objects.filter(pk__in=list(seeded)).values_list("status", flat=True))
    if statuses != Counter({LeaseStatus.PENDING: len(seeded)}):
        failures.append(f"lease statuses after the run: {dict(statuses)} (expected all {len(seeded)} pending)")
    events = dict(
        LeaseEvent.objects.filter(action=LeaseAction.TRANSFERRED)
        .values("lease")
        .annotate(n=Count("pk"))
        .values_list("lease", "n")
    )
    wrong = {pk: events.get(pk, 0) for pk in seeded if events.get(pk, 0) != 1}
    if wrong:
        sample = ", ".join(f"lease {pk}: {n}" for pk, n in list(wrong.items())[:5])
        failures.append(f"{len(wrong)} leases without exactly one 'transferred' event ({sample})")
    retries = LeaseEvent.objects.filter(action__in=(LeaseAction.TRANSFER_RETRY, LeaseAction.TRANSFER_FAILED)).count()
    if retries:
        failures.append(f"{retries} transfer_retry/transfer_failed events")

    posts: Counter[str] = Counter()
    posted_to: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}
    for name, fake in list(server.state.teams.items()):
        with fake.lock:
            for email in fake.invite_posts:
                posts[email] += 1
                posted_to.setdefault(email, set()).add(name)
            members[name] = {m.email for m in fake.members.values()}
    emails = {email for email, _ in seeded.values()}
    not_once = {email: posts[email] for email in emails if posts[email] != 1}
    if not_once:
        sample = ", ".join(f"{email}: {n}" for email, n in list(not_once.items())[:5])
        failures.append(f"{len(not_once)} emails without exactly one invite POST ({sample})")
    new_team = dict(MemberLease.objects.filter(pk__in=list(seeded)).values_list("pk", "team__name"))
    misplaced = still_seated = 0
    for pk, (email, old_team) in seeded.items():
        if new_team.get(pk) == old_team or posted_to.get(email, set()) != {new_team.get(pk)}:
            misplaced += 1
        if email in members.get(old_team, set()):
            still_seated += 1
    if misplaced:
        failures.append(f"{misplaced} leases not invited to exactly their new team")
    if still_seated:
        failures.append(f"{still_seated} members still seated in their old team")
    over = check_seats(capacity)
    if over:
        failures.append(over)
    return failures


def check_seats(capacity: int) -> str:
    """'' when no team holds more leases than its capacity and every seat counter equals a
    recount of the leases; else what is wrong."""
    from leases.models import Team
    from leases.selectors import teams_seat_drift, teams_seat_recount

    problems = []
    recount = teams_seat_recount()
    capacities = dict(Team.objects.values_list("pk", "capacity"))
    over = {pk: n for pk, n in recount.items() if n > capacities.get(pk, capacity)}
    if over:
        problems.append(f"teams over capacity (team id: seats): {over}")
    drift = teams_seat_drift()
    if drift:
        problems.append(f"seat counters differ from a recount (counter, recount): {drift}")
    return "; ".join(problems)


def run_transfers(
    args: argparse.Namespace,
    server: FakeProviderServer,
    log_dir: Path,
    *,
    workers_count: int,
    concurrency: int,
    label: str,
    tag: str,
) -> TransferFigures:
    from django.conf import settings
    from django.db import close_old_connections
    from django.db.models import Max, Min

    from leases.models import LeaseAction, LeaseEvent
    from leases.tasks import run_transfers as run_transfers_task

    reset_leases(server)
    reset_broker(args)
    other = getattr(args, "other_leases", 0)
    capacity = args.capacity + (other_leases_per_team(other, args.teams) if other else 0)
    teams = create_teams(server, args.teams, capacity)
    seed_other_leases(teams, other)
    seeded = seed_transfers(server, teams, args.transfers)
    if other and connection_vendor() == "postgresql":
        analyze_tables()
    with server.state._lock:
        server.state.requests.clear()
    close_old_connections()

    with running_workers(workers_count, concurrency, args, log_dir, tag) as workers:
        cpu_before = cpu_sample()
        started = time.time()
        task_ids = [run_transfers_task.delay().id for _ in range(workers_count)]
        done = wait_for_transfers(workers, task_ids, args.timeout)
        observed = time.time() - started
        cpu_busy = cpu_busy_percent(cpu_before, cpu_sample())
    bounds = LeaseEvent.objects.filter(action__in=(LeaseAction.TRANSFER_STARTED, LeaseAction.TRANSFERRED)).aggregate(
        first=Min("created_at"), last=Max("created_at")
    )
    # Same host, same clock: the last 'transferred' event is exact where polling is not.
    seconds = bounds["last"].timestamp() - started if bounds["last"] else observed
    processing = (bounds["last"] - bounds["first"]).total_seconds() if bounds["first"] else 0.0
    per_worker = [
        {"worker": info["worker"].split("@")[0], "task_seconds": info["seconds"], **info["summary"]}
        for task_id, info in done.items()
        if task_id in task_ids
    ]
    failures = check_transfers(server, seeded, capacity)
    return TransferFigures(
        label=label,
        workers=workers_count,
        concurrency=concurrency,
        batch_size=settings.LEASE_TRANSFER_BATCH_SIZE,
        transfers=len(seeded),
        seconds=seconds,
        processing_seconds=processing,
        invite_posts=server.state.calls(method="POST"),
        deletes=server.state.calls(method="DELETE"),
        per_worker=per_worker,
        cpu_busy=cpu_busy,
        failures=failures,
    )


def report_transfers(figures: TransferFigures, latency: float) -> None:
    busy = figures.invite_posts + figures.deletes
    rows: list[tuple[str, str]] = [
        ("processes", f"{figures.workers} celery worker(s), --pool=solo, one leases.run_transfers task each"),
        ("threads", f"LEASE_TRANSFER_CONCURRENCY={figures.concurrency} per process, batch {figures.batch_size}"),
        ("transfers", str(figures.transfers)),
        ("total time", f"{figures.seconds:.2f} s  [tasks sent -> last 'transferred' event]"),
        ("processing", f"{figures.processing_seconds:.2f} s  [first 'transfer_started' -> last 'transferred']"),
        ("transfers/s", f"{figures.per_second:.1f}"),
        ("machine CPU", f"busy {busy_text(figures.cpu_busy)} while it ran (everything on the host counts)"),
        (
            "provider calls",
            f"{figures.invite_posts} POST invites, {figures.deletes} DELETE members "
            f"(latency alone {busy * latency:.1f} s sequential, "
            f"{busy * latency / (figures.workers * figures.concurrency):.1f} s over "
            f"{figures.workers * figures.concurrency} threads)",
        ),
    ]
    for worker in figures.per_worker:
        rows.append(
            (
                f"  {worker['worker']}",
                ", ".join(f"{k} {v}" for k, v in worker.items() if k != "worker"),
            )
        )
    rows.append(("correctness", "ok (one 'transferred' event per lease, one invite POST per email)"))
    if figures.failures:
        rows.pop()
        rows += [("CHECK FAILED", failure) for failure in figures.failures]
    print_rows(f"transfers: {figures.label}", rows)


# --- output ---------------------------------------------------------------------------------------


def busy_text(percent: float | None) -> str:
    return "n/a" if percent is None else f"{percent:.0f}% of {os.cpu_count()} cores"


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    sys.stdout.flush()


@contextmanager
def bench_session(argv: list[str]) -> Iterator[tuple[argparse.Namespace, FakeProviderServer, Path]]:
    """Parsed arguments, a started fake provider and a set-up, migrated bench database, for the
    ``measure_*`` functions (the lead's combined table calls them, one per child process)."""
    args = parse_args(argv)
    from leasesite.fakes.team_provider_server import FakeProviderServer

    log_dir = Path(tempfile.mkdtemp(prefix="leasesite-leases-bench-"))
    server = FakeProviderServer(latency=args.latency)
    server.start()
    try:
        configure_environment(args, log_dir)
        ensure_database(args)
        setup_django(log_dir / "run.log")
        migrate()
        yield args, server, log_dir
    finally:
        server.stop()
        for path in log_dir.iterdir():
            path.unlink()
        log_dir.rmdir()


def measure_join_sync(teams: int = 10, leases: int = 1000, latency: float = 0.02, **options: Any) -> dict[str, Any]:
    """One join sync of ``teams`` x ``leases`` pending leases (half of them joined at the provider):
    provider calls, database queries (all threads), seconds, and whether its checks held."""
    argv = ["--only", "sync", "--teams", str(teams), "--leases", str(leases), "--latency", str(latency)]
    argv += ["--capacity", str(max(leases, 2000)), *_option_argv(options)]
    with bench_session(argv) as (args, server, _log_dir):
        from django.conf import settings

        figures = run_sync(server, args.teams, args.capacity, args.leases)
        return {
            "teams": figures.teams,
            "leases_per_team": figures.leases_per_team,
            "calls": figures.calls_total,
            "queries": figures.queries,
            "seconds": round(figures.seconds, 3),
            "concurrency": settings.LEASE_SYNC_CONCURRENCY,
            "joined": figures.joined,
            "ok": not figures.failures,
            "checks": "; ".join(figures.failures) or "ok (every member activated with its id and joined_at, GETs only)",
        }


def measure_transfers(
    workers: int,
    threads: int = 4,
    transfers: int = 1000,
    other_leases: int = 0,
    latency: float = 0.02,
    **options: Any,
) -> dict[str, Any]:
    """``transfers`` due leases moved by ``workers`` celery worker processes x ``threads``, with
    ``other_leases`` extra rows in the table: seconds, transfers per second and the checks (one
    invite per email, one ``transferred`` event each, no team over capacity, counters = recount)."""
    argv = ["--only", "transfers", "--workers", str(workers), "--concurrency", str(threads)]
    argv += ["--transfers", str(transfers), "--other-leases", str(other_leases), "--latency", str(latency)]
    argv += ["--no-compare", *_option_argv(options)]
    with bench_session(argv) as (args, server, log_dir):
        label = f"{workers} worker processes x {threads} threads, {other_leases} other leases"
        figures = run_transfers(args, server, log_dir, workers_count=workers, concurrency=threads, label=label, tag="m")
        return {
            "workers": workers,
            "threads": threads,
            "other_leases": other_leases,
            "transfers": figures.transfers,
            "seconds": round(figures.seconds, 3),
            "per_s": round(figures.per_second, 1),
            "calls": figures.invite_posts + figures.deletes,
            "one_invite_per_email": not any("invite POST" in f for f in figures.failures),
            "one_transferred_event_each": not any("'transferred' event" in f for f in figures.failures),
            "no_team_over_capacity": not any("over capacity" in f for f in figures.failures),
            "ok": not figures.failures,
            "checks": "; ".join(figures.failures) or "ok (one invite per email, one transferred each, seats ok)",
        }


def _option_argv(options: dict[str, Any]) -> list[str]:
    """Extra CLI options as keyword arguments: ``database_url="..."`` -> ``--database-url ...``."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from leasesite.fakes.team_provider_server import FakeProviderServer

    log_dir = Path(tempfile.mkdtemp(prefix="leasesite-leases-bench-"))
    server = FakeProviderServer(latency=args.latency)
    server.start()
    summary: dict[str, Any] = {"teams": args.teams, "latency_s": args.latency}
    failed = False
    try:
        configure_environment(args, log_dir)
        ensure_database(args)
        setup_django(log_dir / "run.log")
        migrate()
        from django.conf import settings
        from django.db import connection

        summary["database"] = connection.vendor
        summary["page_size"] = settings.LEASE_PROVIDER_PAGE_SIZE
        print(
            f"database {connection.vendor} ({connection.settings_dict['NAME']}), fake provider at {server.url} with "
            f"{args.latency * 1000:.0f} ms per answer, {args.teams} teams",
            flush=True,
        )
        if args.only != "transfers":
            big = run_sync(server, args.teams, args.capacity, args.leases)
            small = run_sync(server, args.teams, args.capacity, args.small_leases)
            report_sync(big, small, args.latency)
            summary["sync"] = big.as_dict()
            summary["sync_small"] = small.as_dict()
            failed |= bool(big.failures or small.failures)
        if args.only != "sync":
            concurrency = settings.LEASE_TRANSFER_CONCURRENCY
            runs = [(args.workers, concurrency, f"{args.workers} worker processes x {concurrency} threads", "multi")]
            if not args.no_compare:
                runs.append((1, 1, "1 worker process x 1 thread (LEASE_TRANSFER_CONCURRENCY=1)", "single"))
            summary["transfers"] = []
            for workers_count, threads, label, tag in runs:
                print(f"\ntransfers: {label} ...", flush=True)
                figures = run_transfers(
                    args, server, log_dir, workers_count=workers_count, concurrency=threads, label=label, tag=tag
                )
                report_transfers(figures, args.latency)
                summary["transfers"].append(figures.as_dict())
                failed |= bool(figures.failures)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}; logs in {log_dir}", file=sys.stderr)
        return EXIT_BENCH_FAILED
    finally:
        server.stop()
    if args.keep_logs:
        print(f"\nlogs in {log_dir}")
    else:
        for path in log_dir.iterdir():
            path.unlink()
        log_dir.rmdir()
    print(json.dumps(summary, separators=(",", ":")))
    return EXIT_CHECK_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
