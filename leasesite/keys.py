"""Every encrypted column of every model: finding them, checking and rotating their keys.

The columns are found by walking the installed models for ``EncryptedTextField``s (tokens, team
API tokens, and whatever gets encrypted next), never from a hard-coded list, so a new encrypted
field is rotated and checked without anybody remembering to add it here.

Ciphertext is read with ``Cast(..., TextField())`` (no decryption on load) in primary-key chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.apps import AppConfig, apps
from django.db import DEFAULT_DB_ALIAS, models, router, transaction
from django.db.models import TextField
from django.db.models.functions import Cast

from leasesite.crypto import (
    UNDECRYPTABLE_MESSAGE,
    SecretDecryptionError,
    decrypt_secret,
    decrypt_with_current_key,
    fingerprint_secret,
)
from leasesite.fields import EncryptedTextField, FingerprintField

ROTATION_CHUNK_SIZE = 500
MAX_IDS_NAMED = 10


@dataclass(frozen=True)
class EncryptedColumn:
    model: type[models.Model]
    field: EncryptedTextField
    fingerprints: tuple[str, ...]  # FingerprintFields of the same model computed from this field

    @property
    def label(self) -> str:
        return f"{self.model._meta.label}.{self.field.name}"


def encrypted_columns(app_configs: Iterable[AppConfig] | None = None) -> list[EncryptedColumn]:
    """The encrypted columns of the installed (managed, concrete) models, in INSTALLED_APPS order."""
    if app_configs is None:
        model_list = apps.get_models()
    else:
        model_list = [model for app_config in app_configs for model in app_config.get_models()]
    columns = []
    for model in model_list:
        if model._meta.proxy or not model._meta.managed:
            continue
        own_fields = model._meta.local_concrete_fields
        for secret in own_fields:
            if isinstance(secret, EncryptedTextField):
                fingerprints = tuple(
                    f.name for f in own_fields if isinstance(f, FingerprintField) and f.source == secret.name
                )
                columns.append(EncryptedColumn(model, secret, fingerprints))
    return columns


def ciphertext_chunks(
    column: EncryptedColumn, *, chunk_size: int, using: str = DEFAULT_DB_ALIAS
) -> Iterator[list[tuple]]:
    """Rows of ``column`` as ``(pk, ciphertext, *fingerprints)``, ``chunk_size`` at a time."""
    last_pk = None
    queryset = column.model._base_manager.using(using).order_by("pk")
    while True:
        chunk = queryset if last_pk is None else queryset.filter(pk__gt=last_pk)
        rows = list(
            chunk.annotate(_ciphertext=Cast(column.field.name, output_field=TextField())).values_list(
                "pk", "_ciphertext", *column.fingerprints
            )[:chunk_size]
        )
        if not rows:
            return
        yield rows
        last_pk = rows[-1][0]


# -- rotation -------------------------------------------------------------------------------------------
@dataclass
class ColumnRotation:
    label: str
    reencrypted: int = 0
    current: int = 0
    empty: int = 0

    def __str__(self) -> str:
        text = f"{self.label}: re-encrypted {self.reencrypted}, already current {self.current}"
        return text + (f", empty {self.empty}" if self.empty else "")


class KeyRotationError(SecretDecryptionError):
    """Rotation stopped at rows no configured key decrypts; ``done`` says what was rotated."""

    def __init__(self, *, label: str, row_ids: list, done: list[ColumnRotation] | None = None) -> None:
        super().__init__(label, row_ids)
        self.label = label
        self.row_ids = row_ids
        self.done = done or []

    def __str__(self) -> str:
        named = ", ".join(f"id {pk}" for pk in self.row_ids[:MAX_IDS_NAMED])
        more = f" and {len(self.row_ids) - MAX_IDS_NAMED} more" if len(self.row_ids) > MAX_IDS_NAMED else ""
        return f"{self.label}: {UNDECRYPTABLE_MESSAGE} (row {named}{more})"


def _plan_chunk(column: EncryptedColumn, rows: list[tuple], report: ColumnRotation) -> list[tuple]:
    """Decrypt a whole chunk before anything is written: (pk, ciphertext, plaintext) to rewrite."""
    rewrites, undecryptable = [], []
    for pk, ciphertext, *fingerprints in rows:
        if not ciphertext:
            report.empty += 1
            continue
        plaintext = decrypt_with_current_key(ciphertext)
        if plaintext is not None and all(fp == fingerprint_secret(plaintext) for fp in fingerprints):
            report.current += 1
            continue
        try:
            plaintext = decrypt_secret(ciphertext) if plaintext is None else plaintext
        except SecretDecryptionError:
            undecryptable.append(pk)
            continue
        rewrites.append((pk, ciphertext, plaintext))
    if undecryptable:
        raise KeyRotationError(label=column.label, row_ids=undecryptable)
    return rewrites


def secrets_rotate(*, chunk_size: int = ROTATION_CHUNK_SIZE, using: str = DEFAULT_DB_ALIAS) -> list[ColumnRotation]:
    """Re-encrypt every encrypted column of every model with the first key of
    ``TOKEN_ENCRYPTION_KEYS`` and recompute the fingerprints computed from it.

    Chunk by chunk: a chunk is fully decrypted first and then written in one transaction, so a row
    that cannot be decrypted stops the rotation with ``KeyRotationError`` before anything of its
    chunk is written. Earlier chunks stay rotated (readable with the new key, which every process
    already has). A row changed by someone else between the read and the write is left alone:
    whoever wrote it used the current key.
    """
    done: list[ColumnRotation] = []
    for column in encrypted_columns():
        if not router.allow_migrate_model(using, column.model):
            continue
        report = ColumnRotation(column.label)
        manager = column.model._base_manager.using(using)
        for rows in ciphertext_chunks(column, chunk_size=chunk_size, using=using):
            try:
                rewrites = _plan_chunk(column, rows, report)
            except KeyRotationError as exc:
                exc.done = [*done, report]
                raise
            with transaction.atomic(using=using):
                for pk, ciphertext, plaintext in rewrites:
                    # update() runs the field's get_prep_value: the plaintext is encrypted with the
                    # current first key on the way to the column. Only if the row still holds the
                    # ciphertext read above (compare-and-set).
                    changes = {column.field.name: plaintext}
                    changes.update({name: fingerprint_secret(plaintext) for name in column.fingerprints})
                    written = (
                        manager.filter(pk=pk)
                        .alias(_ciphertext=Cast(column.field.name, output_field=TextField()))
                        .filter(_ciphertext=ciphertext)
                        .update(**changes)
                    )
                    if written:
                        report.reencrypted += 1
                    else:
                        report.current += 1
        done.append(report)
    return done
