from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.services.legacy import legacy_db_import
from leases.services.transitions import LeaseError


class Command(BaseCommand):
    help = (
        "Import leases from the old system's SQLite file (table member_leases). Create the teams first. "
        "Safe to run again: rows imported before are left alone. All or nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", metavar="PATH", help="the old system's SQLite file (opened read-only)")
        parser.add_argument("--dry-run", action="store_true", help="report what would be imported; write nothing")

    def handle(self, *args: object, **options: object) -> None:
        try:
            report = legacy_db_import(path=options["path"], dry_run=options["dry_run"])
        except LeaseError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(report.as_text())
