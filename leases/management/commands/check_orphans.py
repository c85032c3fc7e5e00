from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.services.orphans import orphans_check


class Command(BaseCommand):
    help = "List members seated in two teams, seated without a lease, or leased but not seated."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-alert", action="store_true", help="print only; do not alert NOTIFY_URLS")

    def handle(self, *args: object, **options: object) -> None:
        report = orphans_check(alert=not options["no_alert"])
        self.stdout.write(report.as_text() or f"{report.teams_checked} team(s) checked: no problems")
        if report.problems or report.teams_failed:
            raise CommandError(f"{report.problems} problem(s), {len(report.teams_failed)} team(s) not listed")
