"""Refresh 报名工具 tokens now, or on a schedule (the old tool's flags, same meaning)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leasesite.cli import positive_int
from tokens.management.commands._logging import configure_command_logging
from tokens.models import RunStatus, RunTrigger
from tokens.services.cleanup import token_cleanup_run
from tokens.services.refresh import RefreshAlreadyRunning, token_refresh_run

EXIT_ALREADY_RUNNING = 75  # EX_TEMPFAIL: try again later


def positive_hours(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of hours, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of hours, got {value}")
    return number


class Command(BaseCommand):
    help = (
        "Check every stored 报名工具 token against the API (keeps valid ones alive, deletes invalid "
        "ones). Exit status: 0 run succeeded, 1 run failed or circuit breaker tripped, "
        f"{EXIT_ALREADY_RUNNING} another refresh run is in progress."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age-days",
            type=positive_int,
            metavar="N",
            help="only tokens used within the last N days (default: all tokens)",
        )
        parser.add_argument(
            "--cleanup-days",
            type=positive_int,
            metavar="N",
            help="after refreshing, delete tokens unused for more than N days",
        )
        parser.add_argument("--scheduler", action="store_true", help="keep running and refresh every --interval hours")
        parser.add_argument(
            "--interval", type=positive_hours, metavar="H", help="hours between runs in --scheduler mode (default 6)"
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
        if not options["scheduler"]:
            if options["interval"] is not None:
                raise CommandError("--interval only makes sense with --scheduler")
            if options["run_immediately"]:
                raise CommandError("--run-immediately only makes sense with --scheduler")
        verbose = options["verbose"] or int(options["verbosity"]) >= 2
        try:
            configure_command_logging(verbose=verbose, log_file=options["log_file"])
        except OSError as exc:
            raise CommandError(f"cannot open --log-file: {exc.strerror}") from None
        if options["scheduler"]:
            self._scheduler(options)
            return
        code = self._run_once(options)
        if code:
            raise CommandError("refresh run did not succeed (see the log above)", returncode=code)

    def _run_once(self, options: dict) -> int:
        progress = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=0, unit="token", desc="refresh", file=sys.stderr)

        def on_start(run) -> None:
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
            )
        except RefreshAlreadyRunning as exc:
            self.stderr.write(f"not started: {exc}")
            return EXIT_ALREADY_RUNNING
        finally:
            if progress is not None:
                progress.close()
        self.stdout.write(
            f"refresh run #{run.pk} {run.status}: total {run.total}, ok {run.ok}, failed {run.failed}, "
            f"invalid {run.invalid}, deleted {run.deleted}, rate-limited {run.rate_limited}, "
            f"{run.duration_seconds or 0:.1f}s"
        )
        code = 0 if run.status == RunStatus.SUCCEEDED else 1
        if options["cleanup_days"]:
            cleanup = token_cleanup_run(
                days=options["cleanup_days"], trigger=RunTrigger.COMMAND, dry_run=options["dry_run"]
            )
            self.stdout.write(f"cleanup run #{cleanup.pk} {cleanup.status}: deleted {cleanup.deleted}")
            if cleanup.status != RunStatus.SUCCEEDED:
                code = 1
        return code

    def _scheduler(self, options: dict) -> None:
        hours = options["interval"] or 6.0
        stop = threading.Event()

        def request_stop(signum: int, frame: object) -> None:
            self.stderr.write(f"signal {signum}: stopping after the current step")
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.stdout.write(f"scheduler: refreshing every {hours:g} h (Ctrl-C or SIGTERM stops)")
        run_now = options["run_immediately"]
        while not stop.is_set():
            if run_now:
                code = self._run_once(options)
                if code:
                    self.stderr.write(f"run ended with status code {code}; next run in {hours:g} h")
            run_now = True
            stop.wait(hours * 3600)
        self.stdout.write("scheduler stopped")
