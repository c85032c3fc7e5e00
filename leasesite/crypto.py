"""Encryption at rest, fingerprints and masking for third-party secrets.

Secrets are encrypted with MultiFernet: the first key of ``TOKEN_ENCRYPTION_KEYS`` encrypts, every
key decrypts, so keys rotate by prepending a new one and running ``rotate_token_keys``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext

UNDECRYPTABLE_MESSAGE = "stored secret cannot be decrypted with any key in TOKEN_ENCRYPTION_KEYS"


class SecretDecryptionError(Exception):
    """A stored secret cannot be decrypted with any configured key."""


class UndecryptableSecret:
    """What an encrypted field holds when no configured key opens its ciphertext.

    Loading such a row does not fail, so pages that never need the plaintext (lists, masked
    displays, metrics) keep working. The value is falsy, like a missing secret; using it as text
    (``str()``, formatting, ``.encode()`` ...) raises ``SecretDecryptionError``. Saving the row
    writes the original ciphertext back unchanged, so putting the old key back recovers it.
    """

    __slots__ = ("ciphertext",)

    def __init__(self, ciphertext: str) -> None:
        self.ciphertext = ciphertext

    def _refuse(self, *args: object, **kwargs: object) -> str:
        raise SecretDecryptionError(UNDECRYPTABLE_MESSAGE)

    __str__ = __format__ = __len__ = __iter__ = __getitem__ = __add__ = __radd__ = _refuse
    # The text methods a secret is used through. No __getattr__: Django probes values with
    # hasattr() (resolve_expression ...), which must see a plain AttributeError.
    encode = strip = lstrip = rstrip = lower = upper = split = startswith = endswith = replace = _refuse

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UndecryptableSecret) and other.ciphertext == self.ciphertext

    def __hash__(self) -> int:
        return hash(self.ciphertext)

    def __repr__(self) -> str:
        return "<UndecryptableSecret>"

    def __copy__(self) -> UndecryptableSecret:
        return self

    def __deepcopy__(self, memo: dict) -> UndecryptableSecret:
        return self


def invalid_key_positions(keys: Sequence[str]) -> list[int]:
    """1-based positions of the entries that are not Fernet keys (32 url-safe base64 bytes)."""
    bad = []
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError, AttributeError):
            bad.append(position)
    return bad


def describe_invalid_keys(keys: Sequence[str]) -> str:
    """Which entries of TOKEN_ENCRYPTION_KEYS are malformed, by position (never the key itself)."""
    positions = invalid_key_positions(keys)
    where = ", ".join(f"key {position} of {len(keys)}" for position in positions)
    return (
        f"TOKEN_ENCRYPTION_KEYS: {where} {'is' if len(positions) == 1 else 'are'} not a valid Fernet key "
        "(32 url-safe base64-encoded bytes, as printed by Fernet.generate_key())"
    )


@lru_cache(maxsize=8)
def _multifernet(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise ImproperlyConfigured("TOKEN_ENCRYPTION_KEYS is empty")
    if invalid_key_positions(keys):
        raise ImproperlyConfigured(describe_invalid_keys(keys))
    return MultiFernet([Fernet(key.encode()) for key in keys])


@lru_cache(maxsize=8)
def _fernet(key: str) -> Fernet:
    return Fernet(key.encode())


def get_fernet() -> MultiFernet:
    return _multifernet(tuple(settings.TOKEN_ENCRYPTION_KEYS))


def encrypt_secret(plaintext: str) -> str:
    return get_fernet().encrypt(plaintext.encode()).decode()


def decrypt_secret(ciphertext: str) -> str:
    try:
        return get_fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretDecryptionError(UNDECRYPTABLE_MESSAGE) from None


def secret_decrypts(ciphertext: str) -> bool:
    """True when some configured key decrypts ``ciphertext``."""
    try:
        get_fernet().decrypt(ciphertext.encode())
    except InvalidToken:
        return False
    return True


def decrypt_with_current_key(ciphertext: str) -> str | None:
    """The plaintext when the first (encrypting) key decrypts ``ciphertext``; else None."""
    try:
        return _fernet(settings.TOKEN_ENCRYPTION_KEYS[0]).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        return None


def fingerprint_secret(plaintext: str) -> str:
    """Keyed hash (HMAC-SHA256) used for uniqueness; reveals nothing without the key."""
    key = settings.TOKEN_FINGERPRINT_KEY.encode()
    return hmac.new(key, plaintext.encode(), hashlib.sha256).hexdigest()


def mask_secret(plaintext: str | UndecryptableSecret | None) -> str:
    """``9a8bb3f233aa4de4b3209b47d5ac0efe`` -> ``9a8b…0efe``; short values are fully hidden."""
    if isinstance(plaintext, UndecryptableSecret):
        return gettext("(cannot be decrypted)")
    if not plaintext:
        return ""
    if len(plaintext) < 12:
        return "…"
    return f"{plaintext[:4]}…{plaintext[-4:]}"
