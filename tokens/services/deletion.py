"""The one way tokens are deleted: in bounded batches, each with an audit record."""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast

from leasesite.crypto import SecretDecryptionError, decrypt_secret, mask_secret
from tokens.models import BaomingToken, RefreshRun, TokenDeletion

DELETE_CHUNK_SIZE = 500


def _masked(ciphertext: str) -> str:
    try:
        return mask_secret(decrypt_secret(ciphertext))
    except SecretDecryptionError:
        return "…"


def tokens_delete(
    *,
    queryset: QuerySet[BaomingToken],
    reason: str,
    run: RefreshRun | None = None,
    actor: AbstractBaseUser | None = None,
    detail: str = "",
    chunk_size: int | None = None,
    on_deleted: Callable[[TokenDeletion], None] | None = None,
) -> int:
    """Delete every token of ``queryset`` in chunks; return how many were deleted.

    Rows are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite serialises
    writers anyway), so two deleters running at once never audit the same token twice.
    """
    chunk_size = chunk_size or DELETE_CHUNK_SIZE  # read at call time, so it can be tuned
    deleted_total = 0
    while True:
        with transaction.atomic():
            rows = list(
                queryset.order_by("id")
                .select_for_update(skip_locked=True)
                .annotate(ciphertext=Cast("token", output_field=TextField()))
                .values(
                    "id",
                    "card_name",
                    "user_name",
                    "ciphertext",
                    "fingerprint",
                    "created_at",
                    "last_used",
                    "last_error",
                )[:chunk_size]
            )
            if not rows:
                return deleted_total
            records = [
                TokenDeletion(
                    token_pk=row["id"],
                    card_name=row["card_name"],
                    user_name=row["user_name"],
                    token_masked=_masked(row["ciphertext"]),
                    fingerprint=row["fingerprint"],
                    reason=reason,
                    detail=(detail or row["last_error"])[:500],
                    token_created_at=row["created_at"],
                    token_last_used=row["last_used"],
                    run=run,
                    actor=actor,
                )
                for row in rows
            ]
            TokenDeletion.objects.bulk_create(records)
            BaomingToken.objects.filter(id__in=[row["id"] for row in rows]).delete()
        deleted_total += len(rows)
        if on_deleted is not None:
            for record in records:
                on_deleted(record)
