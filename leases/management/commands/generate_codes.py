from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.management.commands._args import positive_int
from leases.models import RedemptionCode
from leases.services.redemption import codes_export_csv, codes_generate
from leases.services.transitions import LeaseError


class Command(BaseCommand):
    help = "Generate a batch of redemption codes and print them as CSV (or write them to --csv PATH)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=positive_int, required=True, metavar="N")
        parser.add_argument("--term-months", type=positive_int, required=True, metavar="M", help="months per team")
        parser.add_argument(
            "--total-months", type=positive_int, metavar="T", help="whole entitlement (default: until cancelled)"
        )
        parser.add_argument("--batch", default="", metavar="LABEL", help="batch label (default: a timestamp)")
        parser.add_argument("--csv", metavar="PATH", help="write the CSV to PATH instead of standard output")

    def handle(self, *args: object, **options: object) -> None:
        try:
            codes = codes_generate(
                count=options["count"],
                term_months=options["term_months"],
                total_months=options["total_months"],
                batch=options["batch"],
            )
        except LeaseError as exc:
            raise CommandError(str(exc)) from None
        text = codes_export_csv(RedemptionCode.objects.filter(code__in=codes).order_by("code"))
        if options["csv"]:
            try:
                Path(options["csv"]).write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"cannot write --csv: {exc.strerror}") from None
            self.stderr.write(f"{len(codes)} code(s) written to {options['csv']}")
        else:
            self.stdout.write(text, ending="")
