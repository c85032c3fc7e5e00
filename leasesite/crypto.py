"""Encryption at rest, fingerprints and masking for third-party secrets.

Tokens are encrypted with MultiFernet: the first key of ``TOKEN_ENCRYPTION_KEYS`` encrypts, every
key decrypts, so keys rotate by prepending a new one and running ``rotate_token_keys``.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SecretDecryptionError(Exception):
    """A stored secret cannot be decrypted with any configured key."""


@lru_cache(maxsize=8)
def _multifernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            "TOKEN_ENCRYPTION_KEYS must be comma-separated Fernet keys (32 url-safe base64 bytes)"
        ) from exc


def get_fernet() -> MultiFernet:
    return _multifernet(tuple(settings.TOKEN_ENCRYPTION_KEYS))


def encrypt_secret(plaintext: str) -> str:
    return get_fernet().encrypt(plaintext.encode()).decode()


def decrypt_secret(ciphertext: str) -> str:
    try:
        return get_fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretDecryptionError("stored secret cannot be decrypted with any key in TOKEN_ENCRYPTION_KEYS") from None


def reencrypt_secret(ciphertext: str) -> str:
    """Re-encrypt with the current first key (no-op in meaning, new ciphertext)."""
    try:
        return get_fernet().rotate(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretDecryptionError("stored secret cannot be decrypted with any key in TOKEN_ENCRYPTION_KEYS") from None


def is_current_key(ciphertext: str) -> bool:
    """True when the ciphertext decrypts with the first (encrypting) key."""
    first = Fernet(settings.TOKEN_ENCRYPTION_KEYS[0].encode())
    try:
        first.decrypt(ciphertext.encode())
    except InvalidToken:
        return False
    return True


def fingerprint_secret(plaintext: str) -> str:
    """Keyed hash (HMAC-SHA256) used for uniqueness; reveals nothing without the key."""
    key = settings.TOKEN_FINGERPRINT_KEY.encode()
    return hmac.new(key, plaintext.encode(), hashlib.sha256).hexdigest()


def mask_secret(plaintext: str | None) -> str:
    """``9a8bb3f233aa4de4b3209b47d5ac0efe`` -> ``9a8b…0efe``; short values are fully hidden."""
    if not plaintext:
        return ""
    if len(plaintext) < 12:
        return "…"
    return f"{plaintext[:4]}…{plaintext[-4:]}"
