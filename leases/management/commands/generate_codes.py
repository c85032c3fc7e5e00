from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from leases.models import RedemptionCode
from leases.services.redemption import MAX_CODES_PER_BATCH, codes_export_csv, codes_generate
from leases.services.transitions import LeaseError
from leasesite.cli import MAX_MONTHS, int_between, months_arg

BATCH_MAX_LENGTH = RedemptionCode._meta.get_field("batch").max_length


def text_at_most(max_length: int) -> Callable[[str], str]:
    """An argparse type: text no longer than the column that stores it."""

    def parse(value: str) -> str:
        if len(value.strip()) > max_length:
            raise argparse.ArgumentTypeError(f"at most {max_length} characters, got {len(value.strip())}")
        return value

    parse.__name__ = "label"
    return parse


class Command(BaseCommand):
    help = "Generate a batch of redemption codes and print them as CSV (or write them to --csv PATH)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--count",
            type=int_between(1, MAX_CODES_PER_BATCH),
            required=True,
            metavar="N",
            help=f"how many codes (1–{MAX_CODES_PER_BATCH})",
        )
        parser.add_argument(
            "--term-months", type=months_arg, required=True, metavar="M", help=f"months per team (1–{MAX_MONTHS})"
        )
        parser.add_argument(
            "--total-months",
            type=months_arg,
            metavar="T",
            help=f"whole entitlement, at least the term (1–{MAX_MONTHS}; default: until cancelled)",
        )
        parser.add_argument(
            "--batch",
            type=text_at_most(BATCH_MAX_LENGTH),
            default="",
            metavar="LABEL",
            help=f"batch label, at most {BATCH_MAX_LENGTH} characters (default: a timestamp)",
        )
        parser.add_argument(
            "--pool",
            type=text_at_most(50),
            default="default",
            metavar="POOL",
            help="the pool whose teams the codes seat (default: default)",
        )
        parser.add_argument("--csv", metavar="PATH", help="write the CSV to PATH instead of standard output")

    def handle(self, *args: object, **options: object) -> None:
        # One transaction: codes that cannot be handed out (the --csv file cannot be written) are
        # not kept either.
        with transaction.atomic():
            try:
                codes = codes_generate(
                    count=options["count"],
                    term_months=options["term_months"],
                    total_months=options["total_months"],
                    batch=options["batch"],
                    pool=options["pool"],
                )
            except LeaseError as exc:
                raise CommandError(str(exc)) from None
            text = codes_export_csv(RedemptionCode.objects.filter(code__in=codes).order_by("code"))
            if options["csv"]:
                try:
                    Path(options["csv"]).write_text(text, encoding="utf-8")
                except OSError as exc:
                    raise CommandError(f"cannot write --csv: {exc.strerror}; no codes were generated") from None
        if options["csv"]:
            self.stderr.write(f"{len(codes)} code(s) written to {options['csv']}")
        else:
            self.stdout.write(text, ending="")
