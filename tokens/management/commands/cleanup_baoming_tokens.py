from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leasesite.cli import days_arg
from tokens.management.commands._logging import configure_command_logging
from tokens.models import RunStatus, RunTrigger
from tokens.services.cleanup import CleanupAlreadyRunning, token_cleanup_run

EXIT_SKIPPED = 75  # EX_TEMPFAIL: try again once a refresh run has reached the upstream


class Command(BaseCommand):
    help = (
        "Delete 报名工具 tokens unused (last_used, or created_at if never used) for more than N days "
        "that the API gave a real answer about within those N days. Skipped (nothing deleted, exit "
        f"status {EXIT_SKIPPED}) while the latest refresh run could not reach the API."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=days_arg, required=True, metavar="N")
        parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
        parser.add_argument("--log-file", metavar="PATH", help="also write the run log to PATH")
        parser.add_argument("--verbose", action="store_true", help="log details of every check (HTTP status, timing)")

    def handle(self, *args: object, **options: object) -> None:
        try:
            configure_command_logging(
                verbose=options["verbose"] or int(options["verbosity"]) >= 2, log_file=options["log_file"]
            )
        except OSError as exc:
            raise CommandError(f"cannot open --log-file: {exc.strerror}") from None
        try:
            run = token_cleanup_run(days=options["days"], trigger=RunTrigger.COMMAND, dry_run=options["dry_run"])
        except CleanupAlreadyRunning as exc:
            raise CommandError(f"not started: {exc}", returncode=EXIT_SKIPPED) from None
        if run.status == RunStatus.SKIPPED:
            self.stdout.write(f"cleanup run #{run.pk} skipped, nothing deleted: {run.error}")
            raise CommandError("cleanup skipped (see above); run it again after a refresh run", returncode=EXIT_SKIPPED)
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(f"cleanup run #{run.pk} {run.status}: {verb} {run.deleted} token(s)")
        if run.status != RunStatus.SUCCEEDED:
            raise CommandError(f"cleanup failed: {run.error}")
