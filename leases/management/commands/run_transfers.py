from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.management.commands._args import email_arg
from leases.services.transfers import transfers_preview, transfers_run


class Command(BaseCommand):
    help = "Move leases whose term is over to the next team (or end them when the entitlement is over)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", type=email_arg, metavar="EMAIL", help="only this customer's lease")
        parser.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")

    def handle(self, *args: object, **options: object) -> None:
        email = options["email"]
        result = transfers_preview(email=email) if options["dry_run"] else transfers_run(email=email)
        for outcome in result.outcomes:
            self.stdout.write(f"{outcome.email}: {outcome.outcome} {outcome.detail}".rstrip())
        summary = ", ".join(f"{k} {v}" for k, v in result.summary().items())
        self.stdout.write(f"{'dry run: ' if options['dry_run'] else ''}{summary}")
        if result.count("failed"):
            raise CommandError(f"{result.count('failed')} lease(s) failed and need an operator")
