"""Refresh 报名工具 tokens now, or on a schedule (the old tool's flags, same meaning)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leasesite.cli import days_arg, hours_arg, minutes_arg
from tokens.management.commands._logging import configure_command_logging
from tokens.models import RefreshRun, RunStatus, RunTrigger
from tokens.services.cleanup import CleanupAlreadyRunning, token_cleanup_run
from tokens.services.refresh import RefreshAlreadyRunning, token_refresh_run

EXIT_FAILED = 1  # the run failed, tripped the breaker or was abandoned
EXIT_TRY_LATER = 75  # EX_TEMPFAIL: another refresh run is in progress, or cleanup was skipped
# Interrupted by a signal: 128 + its number (143 for SIGTERM, 130 for Ctrl-C), like a shell.


DEFAULT_INTERVAL_HOURS = 6.0


def scheduler_interval_hours(*, interval: float | None, interval_minutes: int | None) -> float | None:
    """Hours between scheduled runs: ``--interval H``, or the old tool's ``--interval-minutes M`` (= M/60).

    The old tool let minutes win silently when both were given; here that is an error, so nobody
    believes the other one is in force.
    """
    if interval_minutes is None:
        return interval
    if interval is not None:
        raise CommandError("give --interval (hours) or --interval-minutes, not both")
    return interval_minutes / 60


def interval_text(hours: float) -> str:
    return f"{hours * 60:g} min" if hours < 1 else f"{hours:g} h"


class _StopRequest:
    """SIGTERM / SIGINT ask the command to stop: the run in flight ends as ``interrupted``."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.event.set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


@contextmanager
def _handling_stop_signals(stop: _StopRequest) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled in the main thread (call_command from a thread)
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Command(BaseCommand):
    help = (
        "Check every stored 报名工具 token against the API (keeps valid ones alive, deletes invalid "
        "ones). Exit status: 0 run succeeded, 1 run failed, tripped the circuit breaker or was abandoned, "
        f"2 bad flags, {EXIT_TRY_LATER} another refresh run is in progress (or the cleanup was skipped), "
        "128+N stopped by signal N (143 for SIGTERM) with the run closed as interrupted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age-days",
            type=days_arg,
            metavar="N",
            help="only tokens used within the last N days (default: all tokens)",
        )
        parser.add_argument(
            "--cleanup-days",
            type=days_arg,
            metavar="N",
            help="after refreshing, delete tokens unused for more than N days that the API answered for recently",
        )
        parser.add_argument("--scheduler", action="store_true", help="keep running and refresh every --interval hours")
        parser.add_argument(
            "--interval", type=hours_arg, metavar="H", help="hours between runs in --scheduler mode (default 6)"
        )
        parser.add_argument(
            "--interval-minutes",
            type=minutes_arg,
            metavar="M",
            help="minutes between runs in --scheduler mode (the old tool's flag: --interval M/60; not both)",
        )
        parser.add_argument(
            "--run-immediately",
            action="store_true",
            help="in --scheduler mode, run once right away instead of after the first interval",
        )
        parser.add_argument("--log-file", metavar="PATH", help="also write the run log to PATH")
        parser.add_argument("--verbose", action="store_true", help="log details of every check (HTTP status, timing)")
        parser.add_argument(
            "--dry-run", action="store_true", help="check tokens and report, but change nothing in the database"
        )

    def handle(self, *args: object, **options: object) -> None:
        options["interval"] = scheduler_interval_hours(
            interval=options["interval"], interval_minutes=options["interval_minutes"]
        )
        if not options["scheduler"]:
            if options["interval_minutes"] is not None:
                raise CommandError("--interval-minutes only makes sense with --scheduler")
            if options["interval"] is not None:
                raise CommandError("--interval only makes sense with --scheduler")
            if options["run_immediately"]:
                raise CommandError("--run-immediately only makes sense with --scheduler")
        verbose = options["verbose"] or int(options["verbosity"]) >= 2
        try:
            configure_command_logging(verbose=verbose, log_file=options["log_file"])
        except OSError as exc:
            raise CommandError(f"cannot open --log-file: {exc.strerror}") from None
        stop = _StopRequest()
        with _handling_stop_signals(stop):
            code = self._scheduler(options, stop) if options["scheduler"] else self._run_once(options, stop)
        if code:
            if stop.event.is_set() and code == stop.exit_code:
                raise CommandError(
                    f"stopped by signal {stop.signum}: the run was closed as interrupted", returncode=code
                )
            raise CommandError("refresh run did not succeed (see the log above)", returncode=code)

    def _run_once(self, options: dict, stop: _StopRequest) -> int:
        progress = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=0, unit="token", desc="refresh", file=sys.stderr)

        def on_start(run: RefreshRun) -> None:
            if progress is not None:
                progress.total = run.planned
                progress.refresh()

        try:
            run = token_refresh_run(
                trigger=RunTrigger.COMMAND,
                max_age_days=options["max_age_days"],
                dry_run=options["dry_run"],
                on_start=on_start,
                on_progress=progress.update if progress is not None else None,
                stop=stop.event,
            )
        except RefreshAlreadyRunning as exc:
            self.stderr.write(f"not started: {exc}")
            return EXIT_TRY_LATER
        finally:
            if progress is not None:
                progress.close()
        self.stdout.write(self._summary(run))
        if run.status == RunStatus.INTERRUPTED:
            return stop.exit_code
        code = 0 if run.status == RunStatus.SUCCEEDED else EXIT_FAILED
        if options["cleanup_days"] and not stop.event.is_set():
            try:
                cleanup = token_cleanup_run(
                    days=options["cleanup_days"], trigger=RunTrigger.COMMAND, dry_run=options["dry_run"]
                )
            except CleanupAlreadyRunning as exc:
                self.stderr.write(f"cleanup not started: {exc}")
                return code or EXIT_TRY_LATER
            if cleanup.status == RunStatus.SKIPPED:
                self.stdout.write(f"cleanup run #{cleanup.pk} skipped, nothing deleted: {cleanup.error}")
                code = code or EXIT_TRY_LATER
            else:
                verb = "would delete" if cleanup.dry_run else "deleted"
                self.stdout.write(f"cleanup run #{cleanup.pk} {cleanup.status}: {verb} {cleanup.deleted}")
                if cleanup.status != RunStatus.SUCCEEDED:
                    code = EXIT_FAILED
        return code

    @staticmethod
    def _summary(run: RefreshRun) -> str:
        deleted = f"would delete {run.deleted}" if run.dry_run else f"deleted {run.deleted}"
        line = (
            f"refresh run #{run.pk} {run.status}{' (dry run)' if run.dry_run else ''}: total {run.total}, ok {run.ok}, "
            f"failed {run.failed}, invalid {run.invalid}, {deleted}, rate-limited {run.rate_limited}, "
            f"{run.duration_seconds or 0:.1f}s"
        )
        if run.breaker_tripped:
            line += (
                "; the circuit breaker would trip: a real run would delete nothing"
                if run.dry_run
                else "; circuit breaker tripped: nothing deleted"
            )
        if run.error and run.status != RunStatus.SUCCEEDED:
            line += f" ({run.error})"
        return line

    def _scheduler(self, options: dict, stop: _StopRequest) -> int:
        hours = options["interval"] or DEFAULT_INTERVAL_HOURS
        self.stdout.write(f"scheduler: refreshing every {interval_text(hours)} (Ctrl-C or SIGTERM stops)")
        run_now = options["run_immediately"]
        while not stop.event.is_set():
            if run_now:
                code = self._run_once(options, stop)
                if stop.event.is_set() and code == stop.exit_code:
                    return code  # stopped in the middle of a run: it was closed as interrupted
                if code:
                    self.stderr.write(f"run ended with status code {code}; next run in {interval_text(hours)}")
            run_now = True
            stop.event.wait(hours * 3600)
        self.stdout.write("scheduler stopped")
        return 0
