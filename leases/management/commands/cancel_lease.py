"""The operator's cancel, from a shell: ``cancel_lease EMAIL [--reason TEXT]`` (DESIGN §6)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.management.commands._args import email_arg
from leases.services.cancellation import lease_cancel_by_email
from leases.services.transitions import LeaseError

MAX_REASON = 500


def reason_arg(value: str) -> str:
    import argparse

    if len(value) > MAX_REASON:
        raise argparse.ArgumentTypeError(f"at most {MAX_REASON} characters, got {len(value)}")
    return value


class Command(BaseCommand):
    help = (
        "Cancel the open lease of EMAIL and free its seat at the provider. If a transfer is working on "
        "it right now, the cancel is requested and the transfer carries it out at its next step."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("email", type=email_arg, metavar="EMAIL")
        parser.add_argument("--reason", type=reason_arg, default="", metavar="TEXT", help="recorded in the history")

    def handle(self, *args: object, **options: object) -> None:
        try:
            outcome = lease_cancel_by_email(email=options["email"], reason=options["reason"] or "cancel_lease command")
        except LeaseError as exc:
            raise CommandError(str(exc)) from None
        lease = outcome.lease
        if not outcome.cancelled:
            self.stdout.write(
                f"lease {lease.pk} ({lease.email}) is being transferred right now: cancel requested; "
                "the transfer cancels it at its next step"
            )
            return
        self.stdout.write(f"lease {lease.pk} ({lease.email}) cancelled")
        if outcome.seats_not_freed:
            raise CommandError(
                f"the seat could not be freed at: {', '.join(outcome.seats_not_freed)} "
                "(recorded in the lease's history; the orphan check will list it)"
            )
