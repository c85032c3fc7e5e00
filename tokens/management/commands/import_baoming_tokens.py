from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.services.tokens import detect_format, tokens_import


class Command(BaseCommand):
    help = (
        "Import tokens from FILE: CSV (header card_name,user_name,token — or those three columns "
        'without a header) or JSON lines ({"card_name": ..., "user_name": ..., "token": ...}). '
        "All or nothing: if any row is bad, every bad row is listed (FILE:LINE: reason), nothing is "
        "imported and the exit status is 1 (--skip-bad-rows imports the good rows anyway). "
        "Duplicates are skipped, not errors."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE")
        parser.add_argument("--format", choices=["csv", "jsonl"], help="default: guessed from the file")
        parser.add_argument(
            "--skip-bad-rows",
            action="store_true",
            help="import the good rows even when some rows are bad (bad rows are still listed, exit status 1)",
        )

    def handle(self, *args: object, **options: object) -> None:
        path = Path(options["file"])
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise CommandError(f"{path}: no such file") from None
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise CommandError(f"{path}:{line}: not UTF-8 text") from None
        except OSError as exc:
            raise CommandError(f"{path}: {exc.strerror}") from None
        report = tokens_import(
            text=text, fmt=options["format"] or detect_format(text, path.name), skip_bad_rows=options["skip_bad_rows"]
        )
        for line, error in report.errors:
            self.stderr.write(f"{path}:{line}: {error}")
        self.stdout.write(
            f"imported {report.imported}, skipped {report.duplicates} duplicate(s), {len(report.errors)} bad row(s)"
        )
        if not report.applied:
            raise CommandError(
                f"{len(report.errors)} bad row(s): nothing was imported "
                "(fix them, or use --skip-bad-rows to import the good rows)"
            )
        if report.errors:
            raise CommandError(f"{len(report.errors)} bad row(s) were not imported (see above)")
