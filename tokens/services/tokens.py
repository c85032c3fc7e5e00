"""Adding tokens (importing them from a file: ``tokens.services.importing``)."""

from __future__ import annotations

import re
import unicodedata

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from leasesite.crypto import fingerprint_secret
from tokens.models import BaomingToken, DeletionReason
from tokens.services.deletion import tokens_delete

TOKEN_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_LENGTH = 100


class TokenValidationError(ValueError):
    """A token or its metadata is not acceptable (the message never contains the token)."""


class DuplicateTokenError(TokenValidationError):
    """The same token is already stored."""


def _normalize_token(raw: str) -> str:
    token = (raw or "").strip().lower()
    if not TOKEN_PATTERN.fullmatch(token):
        raise TokenValidationError("token must be 32 hexadecimal characters")
    return token


def _normalize_name(raw: str | None, *, label: str, required: bool) -> str:
    value = (raw or "").strip()
    if required and not value:
        raise TokenValidationError(f"{label} is required")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise TokenValidationError(f"{label} contains a control character")
    if len(value) > MAX_NAME_LENGTH:
        raise TokenValidationError(f"{label} is longer than {MAX_NAME_LENGTH} characters")
    return value


def token_add(*, card_name: str, user_name: str = "", token: str) -> BaomingToken:
    """Store one token (validated, encrypted). Raises ``DuplicateTokenError`` if already stored."""
    card_name = _normalize_name(card_name, label="card name", required=True)
    user_name = _normalize_name(user_name, label="user name", required=False)
    token = _normalize_token(token)
    if BaomingToken.objects.filter(fingerprint=fingerprint_secret(token)).exists():
        raise DuplicateTokenError("this token is already stored")
    try:
        with transaction.atomic():
            return BaomingToken.objects.create(card_name=card_name, user_name=user_name, token=token)
    except IntegrityError:
        raise DuplicateTokenError("this token is already stored") from None


def tokens_delete_by_operator(*, token_ids: list[int], actor: AbstractBaseUser | None) -> int:
    return tokens_delete(
        queryset=BaomingToken.objects.filter(id__in=token_ids),
        reason=DeletionReason.ADMIN,
        actor=actor,
        detail="deleted in the admin",
    )
