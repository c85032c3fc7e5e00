from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from leasesite.crypto import SecretDecryptionError
from tokens.services.keys import token_keys_rotate


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored token with the first key of TOKEN_ENCRYPTION_KEYS (and recompute "
        "fingerprints). Rotate by prepending a new key, running this, then dropping the old key."
    )

    def handle(self, *args: object, **options: object) -> None:
        try:
            rewritten, current = token_keys_rotate()
        except SecretDecryptionError as exc:
            raise CommandError(f"{exc}; keep the old key in TOKEN_ENCRYPTION_KEYS until rotation succeeds") from None
        self.stdout.write(f"re-encrypted {rewritten} token(s); {current} already used the current key")
