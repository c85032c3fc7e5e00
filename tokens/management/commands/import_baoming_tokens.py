from __future__ import annotations

import argparse
import codecs
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.services.import_formats import FORMAT_LABELS, FORMATS, ImportFormatError
from tokens.services.importing import ImportReport, RowOutcome, tokens_import

# Byte order marks we decode (longest first: the UTF-32 LE mark starts with the UTF-16 LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def time_zone_arg(value: str) -> ZoneInfo:
    """An argparse type: an IANA time zone name (``Asia/Shanghai``, ``UTC``)."""
    try:
        if len(value) > 64:
            raise ValueError
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown time zone {value[:64]!r} (an IANA name such as Asia/Shanghai or UTC)"
        ) from None


time_zone_arg.__name__ = "time zone"


def read_text(path: Path, *, label: str) -> str:
    """The file's text: UTF-8 (with or without a BOM), or UTF-16/32 with a BOM (Windows tools write those)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{label}{path}: no such file") from None
    except OSError as exc:
        raise CommandError(f"{label}{path}: {exc.strerror}") from None
    encoding, start = "utf-8", 0
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, start = name, len(bom)
            break
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1 if encoding == "utf-8" else "?"
        raise CommandError(f"{label}{path}:{line}: not {encoding.upper()} text (save the file as UTF-8)") from None


class Command(BaseCommand):
    help = (
        "Import tokens from FILE. The format is detected from the content: CSV (card_name,user_name,token "
        'with or without a header), JSON lines ({"card_name": ..., "user_name": ..., "token": ...}), the old '
        "refresh tool's JSON store (baoming_tokens.json), or a mongoexport of its baoming_tokens collection "
        "(JSON lines, --jsonArray or --pretty; give --cards with a mongoexport of its cards collection for the "
        "card names). All or nothing: if any row is bad, every bad row is listed (FILE:LINE: reason), nothing "
        "is imported and the exit status is 1 (--skip-bad-rows imports the good rows anyway). Duplicates (the "
        "same token, or the same person by unionid, already stored or twice in the file) are skipped and "
        "listed. --dry-run says what would happen and writes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE")
        parser.add_argument("--format", choices=FORMATS, help="default: detected from the content")
        parser.add_argument(
            "--cards",
            metavar="FILE",
            help="a mongoexport of the old tool's cards collection: card names (default: card_<card id>)",
        )
        parser.add_argument(
            "--old-time-zone",
            type=time_zone_arg,
            metavar="NAME",
            help="mongoexport files: the time zone the old tool ran in; its dates are that local time "
            "(default: DJANGO_TIME_ZONE)",
        )
        parser.add_argument(
            "--skip-bad-rows",
            action="store_true",
            help="import the good rows even when some rows are bad (bad rows are still listed, exit status 1)",
        )
        parser.add_argument("--dry-run", action="store_true", help="say what would be imported; write nothing")

    def handle(self, *args: object, **options: object) -> None:
        path = Path(options["file"])
        text = read_text(path, label="")
        if not text.strip():
            # A 0-byte file is a failed copy or download, not an export: even an empty store or
            # collection is "{}" or "[]" (those import nothing and succeed).
            raise CommandError(f"{path}: the file is empty (nothing to import)")
        cards_path = Path(options["cards"]) if options["cards"] else None
        cards_text = read_text(cards_path, label="--cards ") if cards_path else None
        try:
            report = tokens_import(
                text=text,
                fmt=options["format"],
                cards_text=cards_text,
                skip_bad_rows=options["skip_bad_rows"],
                dry_run=options["dry_run"],
                old_tz=options["old_time_zone"],
            )
        except ImportFormatError as exc:
            raise CommandError(f"{path}: {exc}") from None
        self._describe(path, cards_path, report, detected=not options["format"])
        for outcome in report.outcomes:
            if report.dry_run or not outcome.imported or int(options["verbosity"]) >= 2:
                self.stdout.write(f"{path}:{self._row(outcome, report.dry_run)}")
        for line, error in report.errors:
            self.stderr.write(f"{path}:{line}: {error}")
        for line, error in report.card_errors:
            self.stderr.write(f"{cards_path}:{line}: {error}")
        self.stdout.write(self._summary(report))
        if report.bad_rows and not options["skip_bad_rows"]:
            raise CommandError(
                f"{report.bad_rows} bad row(s): nothing {'would be' if report.dry_run else 'was'} imported "
                "(fix them, or use --skip-bad-rows to import the good rows)"
            )
        if report.bad_rows:
            raise CommandError(
                f"{report.bad_rows} bad row(s) {'would not be' if report.dry_run else 'were not'} imported (see above)"
            )

    def _describe(self, path: Path, cards_path: Path | None, report: ImportReport, *, detected: bool) -> None:
        how = "detected" if detected else "as --format says"
        self.stdout.write(f"{path}: {FORMAT_LABELS[report.format]} ({how}), {report.rows} row(s)")
        if cards_path is not None:
            self.stdout.write(f"card names: from {cards_path} ({report.cards_known} card(s))")
        elif report.card_names_from_ids:
            self.stdout.write(
                f"card names: card_<card id> for {report.card_names_from_ids} row(s), as no --cards file was "
                "given (rename them in the admin, or import with --cards)"
            )

    @staticmethod
    def _row(outcome: RowOutcome, dry_run: bool) -> str:
        where = f"{outcome.line}: " + (f"{outcome.key}: " if outcome.key else "")
        if not outcome.imported:
            return f"{where}duplicate, {'would skip' if dry_run else 'skipped'}: {outcome.duplicate_of}"
        verb = "would import" if dry_run else "imported"
        user = outcome.user_name or "-"
        return f"{where}{verb}: card {outcome.card_name} | user {user} | token {outcome.masked_token}"

    @staticmethod
    def _summary(report: ImportReport) -> str:
        if report.dry_run:
            return (
                f"dry run, nothing written: would import {report.imported}, would skip {report.duplicates} "
                f"duplicate(s), {report.bad_rows} bad row(s)"
            )
        return f"imported {report.imported}, skipped {report.duplicates} duplicate(s), {report.bad_rows} bad row(s)"
