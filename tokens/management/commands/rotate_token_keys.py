from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from leasesite.cli import int_between
from leasesite.keys import ROTATION_CHUNK_SIZE, KeyRotationError, secrets_rotate


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored secret (every encrypted column of every model: 报名工具 tokens, team "
        "API tokens ...) with the first key of TOKEN_ENCRYPTION_KEYS and recompute fingerprints. Rotate "
        "by prepending a new key, running this, then dropping the old key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--chunk-size",
            type=int_between(1, 10_000),
            default=ROTATION_CHUNK_SIZE,
            metavar="N",
            help=f"rows re-encrypted per transaction (default {ROTATION_CHUNK_SIZE})",
        )

    def handle(self, *args: object, **options: object) -> None:
        try:
            reports = secrets_rotate(chunk_size=options["chunk_size"])
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        except KeyRotationError as exc:
            for report in exc.done:
                self.stdout.write(str(report))
            raise CommandError(
                f"{exc}; rotation stopped and nothing of that chunk was written: keep the old key in "
                "TOKEN_ENCRYPTION_KEYS (behind the new one) until rotation succeeds. Rows rotated so far "
                "are readable with the new key, the others still with the old one. Put back the key that "
                "encrypted the rows named, or re-enter those secrets, then run rotate_token_keys again."
            ) from None
        for report in reports:
            self.stdout.write(str(report))
