"""Encryption-key rotation for stored tokens."""

from __future__ import annotations

from django.db import transaction
from django.db.models import TextField
from django.db.models.functions import Cast

from leasesite.crypto import decrypt_secret, fingerprint_secret, is_current_key
from tokens.models import BaomingToken


def token_keys_rotate(*, chunk_size: int = 500) -> tuple[int, int]:
    """Re-encrypt every token with the first key of ``TOKEN_ENCRYPTION_KEYS`` and recompute its
    fingerprint. Returns (rewritten, already_current). Raises ``SecretDecryptionError`` if a row
    cannot be decrypted with any configured key (nothing of that chunk is written).
    """
    rewritten = current = 0
    last_id = 0
    while True:
        rows = list(
            BaomingToken.objects.filter(id__gt=last_id)
            .order_by("id")
            .annotate(ciphertext=Cast("token", output_field=TextField()))
            .values_list("id", "ciphertext", "fingerprint")[:chunk_size]
        )
        if not rows:
            return rewritten, current
        with transaction.atomic():
            for token_id, ciphertext, fingerprint in rows:
                plaintext = decrypt_secret(ciphertext)
                new_fingerprint = fingerprint_secret(plaintext)
                if is_current_key(ciphertext) and new_fingerprint == fingerprint:
                    current += 1
                    continue
                # update() runs the field's get_prep_value: the plaintext is encrypted with the
                # current first key on the way to the column.
                BaomingToken.objects.filter(id=token_id).update(token=plaintext, fingerprint=new_fingerprint)
                rewritten += 1
        last_id = rows[-1][0]
