#!/usr/bin/env python
"""Benchmark one whole 报名工具 token refresh run against the fake upstream.

Starts ``FakeBaomingServer`` in this process, seeds ``--tokens`` tokens into the bench database
(deleting every token and run there first), then refreshes them all:

* ``--workers 1``: ``token_refresh_run`` in this process, like ``manage.py refresh_tokens``;
* ``--workers K`` (K >= 2): ``measure_refresh``: K real ``celery worker --pool=solo`` processes share
  the run through ``tokens.refresh_tokens`` -> ``tokens.refresh_batch``, the Redis broker and the
  Redis limiter.

``measure_refresh(...)`` and ``measure_old_tool(...)`` return figures as dicts for the combined
benchmark (benchmarks/table.py); see benchmarks/README.md.

It prints figures and asserts nothing about time. Exit status: 0 done, 1 the fake upstream saw
more than ``--rate`` requests within some 1-second window (a correctness failure), 2 bad
arguments, 3 the benchmark itself could not run (workers did not start, run did not finish).

Example: ``python benchmarks/refresh_tokens.py --tokens 2000 --latency 0.05 --rate 100 --workers 2``
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))  # run as a script from anywhere: make the project importable

from benchmarks.common import (  # noqa: E402 - after the sys.path set-up above
    BenchmarkError,
    Worker,
    non_negative_float,
    positive_float,
    positive_int,
    queue_name,
    stop_workers,
    wait_until_ready,
)

if TYPE_CHECKING:
    from leasesite.fakes.baoming_server import FakeBaomingServer
    from tokens.models import RefreshRun

RATE_LIMIT_KEY = "leasesite:ratelimit:baoming"  # get_rate_limiter(name="baoming") with Redis
REFRESH_LOCK_NAME = "tokens.refresh"
EXIT_OK, EXIT_RATE_EXCEEDED, EXIT_USAGE, EXIT_BENCH_FAILED = 0, 1, 2, 3
POLL_SECONDS = 0.05

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/leasesite_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/3"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/4"
DEFAULT_QUEUE = "leasesite-bench"


# --- arguments --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time one 报名工具 token refresh run against a local fake upstream.")
    add = parser.add_argument
    add("--tokens", type=positive_int, default=2000, help="tokens to seed and refresh (default: %(default)s)")
    add(
        "--latency",
        type=non_negative_float,
        default=0.05,
        help="seconds the fake upstream adds to every answer (default: %(default)s)",
    )
    add(
        "--rate",
        type=positive_float,
        default=100.0,
        help="the upstream's limit in req/s, shared by all workers; BAOMING_RATE_LIMIT unless --limiter-rate "
        "(default: %(default)s)",
    )
    add(
        "--limiter-rate",
        type=positive_float,
        default=None,
        help="BAOMING_RATE_LIMIT when it should differ from --rate, to try headroom below the limit; --rate stays "
        "the limit checked and the base of the ideal time (default: --rate)",
    )
    add(
        "--workers",
        type=positive_int,
        default=1,
        help="1: in this process; K>=2: K celery worker processes, --pool=solo (default: %(default)s)",
    )
    add(
        "--concurrency",
        type=positive_int,
        default=None,
        help="BAOMING_CONCURRENCY, the upper bound of checks in flight per process (default: the project's)",
    )
    add("--batch-size", type=positive_int, default=None, help="BAOMING_BATCH_SIZE (default: the project's)")
    add(
        "--timeout",
        type=positive_float,
        default=None,
        help="give up when the run has not ended after this many seconds (default: 5 x tokens / min(rate, 200) + 60)",
    )
    add(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="bench database, created if missing; ALL its tokens and runs are deleted (default: %(default)s)",
    )
    add("--redis-url", default=DEFAULT_REDIS_URL, help="REDIS_URL, the rate limiter (default: %(default)s)")
    add("--broker-url", default=DEFAULT_BROKER_URL, help="CELERY_BROKER_URL (default: %(default)s)")
    add("--queue", type=queue_name, default=DEFAULT_QUEUE, help="CELERY_TASK_DEFAULT_QUEUE (default: %(default)s)")
    add("--keep-logs", action="store_true", help="keep the run and worker logs (their folder is printed)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    database = urlsplit(args.database_url)
    if database.scheme not in ("postgres", "postgresql", "pgsql"):
        parser.error("--database-url must be a PostgreSQL URL (worker processes share it)")
    if "bench" not in database.path.lstrip("/"):
        parser.error("--database-url must name a database whose name contains 'bench': every token in it is deleted")
    for option, url in (("--redis-url", args.redis_url), ("--broker-url", args.broker_url)):
        if urlsplit(url).scheme not in ("redis", "rediss"):
            parser.error(f"{option} must be a redis:// URL")
    if args.redis_url == args.broker_url:
        parser.error("--redis-url and --broker-url must be different Redis databases")
    if args.limiter_rate is None:
        args.limiter_rate = args.rate
    if args.timeout is None:
        args.timeout = default_timeout(args.tokens, args.rate)
    return args


def default_timeout(tokens: int, rate: float) -> float:
    """Five times the ideal time, the ideal taken at no more than 200 checks/s (a limit far above
    what the host can do — the CPU-ceiling rows — must not make the timeout tiny), plus a minute."""
    return 5 * tokens / min(rate, 200.0) + 60


# --- environment and database -----------------------------------------------------------------


def configure_environment(args: argparse.Namespace, *, api_base: str) -> None:
    """Settings come from the environment; worker subprocesses inherit the same one."""
    if not os.environ.get("TOKEN_ENCRYPTION_KEYS"):
        from cryptography.fernet import Fernet

        os.environ["TOKEN_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    if not os.environ.get("DJANGO_SECRET_KEY"):
        os.environ["DJANGO_SECRET_KEY"] = secrets.token_urlsafe(48)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "leasesite.settings",
            # Production-like: with DEBUG on, Django keeps every SQL query of a process in memory.
            "DJANGO_DEBUG": "false",
            "DATABASE_URL": args.database_url,
            "REDIS_URL": args.redis_url,
            "CELERY_BROKER_URL": args.broker_url,
            "CELERY_TASK_DEFAULT_QUEUE": args.queue,
            "CELERY_TASK_ALWAYS_EAGER": "false",
            "BAOMING_API_BASE": api_base,
            "BAOMING_RATE_LIMIT": repr(args.limiter_rate),
            "NOTIFY_URLS": "",
        }
    )
    # None: the project's defaults, as a deployment that sets nothing gets them.
    for name, value in (("BAOMING_CONCURRENCY", args.concurrency), ("BAOMING_BATCH_SIZE", args.batch_size)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(value)


def ensure_database(database_url: str) -> None:
    """Create the bench database if it is missing (PostgreSQL, through the maintenance database)."""
    import psycopg
    from psycopg import sql

    url = urlsplit(database_url)
    name = url.path.lstrip("/")
    maintenance = url._replace(scheme="postgresql", path="/postgres").geturl()
    with psycopg.connect(maintenance, autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def setup_django(log_path: Path) -> None:
    import django

    django.setup()
    # The per-token run log is part of the work (as with the command), but goes to a file.
    from leasesite.log_filters import SecretScrubFilter

    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(SecretScrubFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def prepare_database(tokens: int) -> None:
    """Migrate, then leave exactly ``tokens`` fresh tokens and no runs, batches or locks."""
    from django.core.management import call_command
    from django.db import connection

    from leasesite.models import JobLock
    from tokens.models import BaomingToken, RefreshRun

    call_command("migrate", interactive=False, verbosity=0)
    with connection.cursor() as cursor:
        # Raw SQL: rows of an earlier invocation may be encrypted with another key, never load them.
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(BaomingToken._meta.db_table)}")
    RefreshRun.objects.all().delete()  # and their batches
    JobLock.objects.filter(name=REFRESH_LOCK_NAME).delete()
    BaomingToken.objects.bulk_create(
        (
            BaomingToken(card_name=f"bench-{index:06d}", user_name=f"user-{index}", token=secrets.token_hex(16))
            for index in range(tokens)
        ),
        batch_size=1000,
    )
    connection.close()


def reset_redis(args: argparse.Namespace) -> None:
    """A fresh limiter, and no task left over in our queue from an interrupted earlier run."""
    import redis

    limiter = redis.Redis.from_url(args.redis_url)
    broker = redis.Redis.from_url(args.broker_url)
    try:
        limiter.delete(RATE_LIMIT_KEY)
        # An empty bucket of a Redis that kept its state: without the epoch key the limiter would
        # treat it as freshly restarted and wait out the slots of a predecessor (2 s, once).
        from leasesite.ratelimit import EPOCH_KEY

        limiter.set(EPOCH_KEY, "1", px=86_400_000)
        stale = list(broker.scan_iter(match=f"{args.queue}*"))
        # The broker database is the benchmark's own: unacked tasks there are ours too.
        broker.delete(*stale, "unacked", "unacked_index", "unacked_mutex")
    finally:
        limiter.close()
        broker.close()


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Figures:
    mode: str
    tokens: int
    workers: int
    concurrency: int
    rate: float
    seconds: float
    timing: str
    run_seconds: float | None
    peak_rss_mb: float
    rss_note: str
    requests: int
    max_in_window: int
    tightest_span: float | None
    gap_stats_ms: tuple[float, float, float] | None
    status: str
    planned: int
    total: int
    ok: int
    failed: int
    invalid: int
    rate_limited: int
    per_worker_rss_mb: list[float] = field(default_factory=list)

    @property
    def ideal_seconds(self) -> float:
        return self.tokens / self.rate

    @property
    def rate_exceeded(self) -> bool:
        return self.max_in_window > self.rate


def arrival_figures(arrivals: list[float], rate: float) -> tuple[float | None, tuple[float, float, float] | None]:
    """The shortest time holding ``floor(rate) + 1`` arrivals (< 1 s means the limit was broken)
    and the min / 1st percentile / median gap between consecutive arrivals, in milliseconds."""
    times = sorted(arrivals)
    span = math.floor(rate) + 1
    tightest = min((times[i + span - 1] - times[i] for i in range(len(times) - span + 1)), default=None)
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    if not gaps:
        return tightest, None
    return tightest, (gaps[0] * 1000, gaps[len(gaps) // 100] * 1000, gaps[len(gaps) // 2] * 1000)


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a live process (``VmHWM``), in MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchmarkError(f"no VmHWM in /proc/{pid}/status")


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def run_in_process(args: argparse.Namespace, server: FakeBaomingServer) -> Figures:
    from tokens.models import RunTrigger
    from tokens.services.refresh import token_refresh_run

    started = time.monotonic()
    run = token_refresh_run(trigger=RunTrigger.COMMAND)
    seconds = time.monotonic() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return _figures(
        args,
        server,
        run,
        mode="in-process (token_refresh_run)",
        seconds=seconds,
        timing="wall clock around token_refresh_run() (includes selecting tokens and creating batches)",
        peak_rss_mb=peak_kb / 1024,
        rss_note="ru_maxrss of this process (it also hosts the fake upstream and the seeding)",
    )


def start_workers(args: argparse.Namespace, log_dir: Path) -> list[Worker]:
    workers = []
    for index in range(args.workers):
        name = f"bench{index + 1}-{os.getpid()}@localhost"
        log = open(log_dir / f"worker-{index + 1}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop_workers
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
            "--loglevel=INFO",
        ]
        process = subprocess.Popen(command, cwd=BASE_DIR, stdout=log, stderr=subprocess.STDOUT)
        workers.append(Worker(name, process, log))
    return workers


@contextmanager
def running_workers(args: argparse.Namespace, log_dir: Path) -> Iterator[list[Worker]]:
    workers = start_workers(args, log_dir)
    try:
        wait_until_ready(workers)
        yield workers
    finally:
        stop_workers(workers)


def wait_for_final_run(timeout: float, workers: list[Worker]) -> RefreshRun:
    from django.db import close_old_connections

    from tokens.models import RefreshRun, RunKind

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [worker.name for worker in workers if worker.process.poll() is not None]
        if dead:
            raise BenchmarkError(f"worker(s) exited during the run: {', '.join(dead)}")
        run = RefreshRun.objects.filter(kind=RunKind.REFRESH).order_by("-id").first()
        if run is not None and run.is_final:
            return run
        time.sleep(POLL_SECONDS)
        close_old_connections()
    raise BenchmarkError(f"the refresh run did not end within {timeout:.0f} s (see the worker logs)")


def _figures(
    args: argparse.Namespace,
    server: FakeBaomingServer,
    run: RefreshRun,
    *,
    mode: str,
    seconds: float,
    timing: str,
    peak_rss_mb: float,
    rss_note: str,
    per_worker_rss_mb: list[float] | None = None,
) -> Figures:
    arrivals = list(server.state.arrivals)
    tightest, gaps = arrival_figures(arrivals, args.rate)
    return Figures(
        mode=mode,
        tokens=args.tokens,
        workers=args.workers,
        concurrency=args.concurrency,
        rate=args.rate,
        seconds=seconds,
        timing=timing,
        run_seconds=_seconds_between(run.started_at, run.ended_at),
        peak_rss_mb=peak_rss_mb,
        rss_note=rss_note,
        per_worker_rss_mb=per_worker_rss_mb or [],
        requests=len(arrivals),
        max_in_window=server.state.max_in_any_second(),
        tightest_span=tightest,
        gap_stats_ms=gaps,
        status=run.status,
        planned=run.planned,
        total=run.total,
        ok=run.ok,
        failed=run.failed,
        invalid=run.invalid,
        rate_limited=run.rate_limited,
    )


def report(figures: Figures, args: argparse.Namespace, *, log_dir: Path | None) -> None:
    from django.conf import settings

    from leasesite.ratelimit import slot_interval_seconds

    jitter = settings.RATE_LIMIT_JITTER_ALLOWANCE
    ratio = figures.seconds / figures.ideal_seconds
    rows: list[tuple[str, str]] = [
        ("mode", figures.mode),
        ("tokens", str(figures.tokens)),
        ("workers", str(figures.workers)),
        ("concurrency", f"up to {settings.BAOMING_CONCURRENCY} checks in flight per process (BAOMING_CONCURRENCY)"),
        ("batch size", str(settings.BAOMING_BATCH_SIZE)),
        ("latency", f"{args.latency * 1000:.0f} ms (fake upstream)"),
        ("rate limit", f"{figures.rate:g} req/s (BAOMING_RATE_LIMIT {args.limiter_rate:g})"),
        ("seconds", f"{figures.seconds:.2f}  [{figures.timing}]"),
        (
            "run duration",
            "-" if figures.run_seconds is None else f"{figures.run_seconds:.2f} s  [RefreshRun.started_at -> ended_at]",
        ),
        ("tokens/s", f"{figures.tokens / figures.seconds:.1f}"),
        ("ideal seconds", f"{figures.ideal_seconds:.2f}  [tokens / rate]"),
        ("ratio", f"{ratio:.3f}  [seconds / ideal]"),
        ("peak RSS", f"{figures.peak_rss_mb:.1f} MB  [{figures.rss_note}]"),
    ]
    if figures.per_worker_rss_mb:
        rows.append(("per-worker RSS", ", ".join(f"{mb:.1f} MB" for mb in figures.per_worker_rss_mb)))
    verdict = "EXCEEDED" if figures.rate_exceeded else "ok"
    rows += [
        ("requests seen", str(figures.requests)),
        ("max in any 1 s", f"{figures.max_in_window} (limit {figures.rate:g}) {verdict}"),
    ]
    if figures.tightest_span is not None:
        rows.append(
            (
                f"tightest {math.floor(figures.rate) + 1} arrivals",
                f"{figures.tightest_span * 1000:.1f} ms  [< 1000 ms means the limit was broken]",
            )
        )
    if figures.gap_stats_ms is not None:
        low, p1, median = figures.gap_stats_ms
        rows.append(
            (
                "arrival gaps",
                f"min {low:.2f} ms, p1 {p1:.2f} ms, median {median:.2f} ms "
                f"(limiter slots {slot_interval_seconds(args.limiter_rate, jitter) * 1000:.2f} ms apart, "
                f"jitter allowance {jitter * 1000:.0f} ms)",
            )
        )
    rows += [
        ("run status", figures.status),
        (
            "run counts",
            f"planned {figures.planned}, total {figures.total}, ok {figures.ok}, "
            f"failed {figures.failed}, invalid {figures.invalid}, rate-limited answers "
            f"{figures.rate_limited}",
        ),
    ]
    if log_dir is not None:
        rows.append(("logs", str(log_dir)))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if figures.ok != figures.tokens:
        print(f"WARNING: {figures.tokens - figures.ok} of {figures.tokens} tokens were not refreshed ok")


# --- the API of the combined benchmark --------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Reset a process' ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5), so the peak read
    after the run is the run's, not the start-up's. False when the kernel refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def measure_refresh(
    tokens: int,
    rate: float,
    latency: float,
    workers: int = 2,
    *,
    concurrency: int | None = None,
    batch_size: int | None = None,
    database_url: str = DEFAULT_DATABASE_URL,
    redis_url: str = DEFAULT_REDIS_URL,
    broker_url: str = DEFAULT_BROKER_URL,
    queue: str = DEFAULT_QUEUE,
    timeout: float | None = None,
    limiter_rate: float | None = None,
) -> dict:
    """One refresh run of ``tokens`` tokens by ``workers`` real Celery worker processes
    (``--pool=solo``) against the fake upstream; figures as a dict (see benchmarks/README.md).

    ``concurrency`` / ``batch_size`` None: the project's defaults (BAOMING_CONCURRENCY,
    BAOMING_BATCH_SIZE). The seeding happens before the workers start, and each worker's peak RSS
    is reset once it is ready: ``peak_rss_mb`` and ``cpu_s_per_1000`` are the run's alone.
    """
    from leasesite.fakes.baoming_server import FakeBaomingServer

    args = argparse.Namespace(
        tokens=tokens,
        latency=latency,
        rate=rate,
        limiter_rate=limiter_rate or rate,
        workers=workers,
        concurrency=concurrency,
        batch_size=batch_size,
        timeout=timeout or default_timeout(tokens, rate),
        database_url=database_url,
        redis_url=redis_url,
        broker_url=broker_url,
        queue=queue,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="leasesite-bench-"))
    server = FakeBaomingServer(latency=latency, invalid_prefix="")
    server.start()
    try:
        configure_environment(args, api_base=server.url)
        ensure_database(database_url)
        _setup_django_once(log_dir / "run.log")
        prepare_database(tokens)
        reset_redis(args)
        from django.db import close_old_connections

        close_old_connections()
        from tokens.models import RunTrigger
        from tokens.tasks import refresh_tokens

        with running_workers(args, log_dir) as procs:
            pids = [worker.process.pid for worker in procs]
            rss_reset = all(reset_peak_rss(pid) for pid in pids)
            cpu_before = [proc_cpu_seconds(pid) for pid in pids]
            server.state.arrivals.clear()
            enqueued_mono = time.monotonic()
            enqueued_at = time.time()
            refresh_tokens.delay(max_age_days=None, trigger=RunTrigger.COMMAND)
            run = wait_for_final_run(args.timeout, procs)
            seconds = run.ended_at.timestamp() - enqueued_at if run.ended_at else time.time() - enqueued_at
            cpu = sum(proc_cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True))
            peaks = [vm_hwm_mb(pid) for pid in pids]
    finally:
        server.stop()
    arrivals = sorted(server.state.arrivals)
    checks = len(arrivals)
    ideal = tokens / rate
    return {
        "tokens": tokens,
        "workers": workers,
        "rate": rate,
        "latency_ms": latency * 1000,
        "seconds": seconds,
        "ideal_seconds": ideal,
        "ratio": seconds / ideal,
        "max_in_any_second": server.state.max_in_any_second(),
        "cpu_s_per_1000": cpu / (checks / 1000) if checks else None,
        "peak_rss_mb": max(peaks, default=0.0),
        "peak_rss_is_the_runs": rss_reset,
        "checks_per_s": checks / seconds if seconds else None,
        "checks": checks,
        "first_request_s": arrivals[0] - enqueued_mono if arrivals else None,
        "last_request_to_end_s": seconds - (arrivals[-1] - enqueued_mono) if arrivals else None,
        "status": run.status,
        "ok": run.ok,
        "total": run.total,
    }


_django_ready = False


def _setup_django_once(log_path: Path) -> None:
    global _django_ready
    if not _django_ready:
        setup_django(log_path)
        _django_ready = True


def measure_old_tool(tokens: int = 100, latency: float = 0.05, *, pause: float = 1.0) -> dict:
    """The old tool's way on the same fake upstream: one token after another with ``requests.get``
    (no session, the old call's parameters) and its ``time.sleep(1)`` between tokens
    (``tools/refresh_baoming_tokens.py`` of 6June6/auto-from, see README "Coming from the old
    refresh tool"). Returns the seconds it took."""
    import requests

    from leasesite.fakes.baoming_server import FakeBaomingServer

    server = FakeBaomingServer(latency=latency, invalid_prefix="")
    server.start()
    values = [secrets.token_hex(16) for _ in range(tokens)]
    ok = 0
    try:
        started = time.monotonic()
        for index, token in enumerate(values):
            response = requests.get(
                f"{server.url}/xcx/enroll/v3/detail",
                params={"eid": "69844bcf8eaa2449c7a37fae", "access_token": token, "referer": "", "spider": "h5"},
                timeout=10,
            )
            ok += response.json().get("sta") == 0
            if index < tokens - 1:
                time.sleep(pause)
        seconds = time.monotonic() - started
    finally:
        server.stop()
    return {"tokens": tokens, "latency_ms": latency * 1000, "pause_s": pause, "seconds": seconds, "ok": ok}


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers >= 2:
        return main_workers(args)
    from leasesite.fakes.baoming_server import FakeBaomingServer

    log_dir = Path(tempfile.mkdtemp(prefix="leasesite-bench-"))
    server = FakeBaomingServer(latency=args.latency, invalid_prefix="")
    server.start()
    try:
        configure_environment(args, api_base=server.url)
        ensure_database(args.database_url)
        setup_django(log_dir / "run.log")
        print(f"seeding {args.tokens} tokens into {urlsplit(args.database_url).path.lstrip('/')} ...", flush=True)
        prepare_database(args.tokens)
        reset_redis(args)
        server.state.arrivals.clear()
        figures = run_in_process(args, server)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}; logs in {log_dir}", file=sys.stderr)
        return EXIT_BENCH_FAILED
    finally:
        server.stop()
    report(figures, args, log_dir=log_dir if args.keep_logs else None)
    if not args.keep_logs:
        for path in log_dir.iterdir():
            path.unlink()
        log_dir.rmdir()
    return EXIT_RATE_EXCEEDED if figures.rate_exceeded else EXIT_OK


def main_workers(args: argparse.Namespace) -> int:
    """K >= 2 workers: ``measure_refresh``, printed as labelled lines and one JSON line."""
    import json

    print(f"seeding {args.tokens} tokens, then {args.workers} workers ...", flush=True)
    try:
        figures = measure_refresh(
            args.tokens,
            args.rate,
            args.latency,
            args.workers,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            database_url=args.database_url,
            redis_url=args.redis_url,
            broker_url=args.broker_url,
            queue=args.queue,
            timeout=args.timeout,
            limiter_rate=args.limiter_rate,
        )
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return EXIT_BENCH_FAILED
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(json.dumps(figures))
    if figures["ok"] != args.tokens:
        print(f"WARNING: {args.tokens - figures['ok']} of {args.tokens} tokens were not refreshed ok")
    return EXIT_RATE_EXCEEDED if figures["max_in_any_second"] > args.rate else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
