from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leasesite.cli import positive_int
from tokens.management.commands._logging import configure_command_logging
from tokens.models import RunStatus, RunTrigger
from tokens.services.cleanup import token_cleanup_run


class Command(BaseCommand):
    help = "Delete 报名工具 tokens unused (last_used, or created_at if never used) for more than N days."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=positive_int, required=True, metavar="N")
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
        run = token_cleanup_run(days=options["days"], trigger=RunTrigger.COMMAND, dry_run=options["dry_run"])
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(f"cleanup run #{run.pk} {run.status}: {verb} {run.deleted} token(s)")
        if run.status != RunStatus.SUCCEEDED:
            raise CommandError(f"cleanup failed: {run.error}")
