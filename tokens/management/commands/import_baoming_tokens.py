from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.services.tokens import detect_format, tokens_import


class Command(BaseCommand):
    help = (
        "Import tokens from FILE: CSV (header card_name,user_name,token — or those three columns "
        'without a header) or JSON lines ({"card_name": ..., "user_name": ..., "token": ...}). '
        "Good rows are imported, duplicates skipped, bad rows reported by line number (exit 1)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", metavar="FILE")
        parser.add_argument("--format", choices=["csv", "jsonl"], help="default: guessed from the file")

    def handle(self, *args: object, **options: object) -> None:
        path = Path(options["file"])
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise CommandError(f"{path}: no such file") from None
        except UnicodeDecodeError:
            raise CommandError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise CommandError(f"{path}: {exc.strerror}") from None
        report = tokens_import(text=text, fmt=options["format"] or detect_format(text, path.name))
        for line, error in report.errors:
            self.stderr.write(f"{path}:{line}: {error}")
        self.stdout.write(
            f"imported {report.imported}, skipped {report.duplicates} duplicate(s), {len(report.errors)} bad row(s)"
        )
        if report.errors:
            raise CommandError(f"{len(report.errors)} bad row(s) were not imported (see above)")
