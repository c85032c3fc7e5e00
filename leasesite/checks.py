"""System checks of the secrets at rest (registered in ``LeasesiteConfig.ready``).

- ``leasesite.E001``: ``TOKEN_ENCRYPTION_KEYS`` is empty or holds an entry that is not a Fernet key.
  Named by position, never printed. A static check: it runs before every management command.
- ``leasesite.E002``: stored secrets — any ``EncryptedTextField`` column of any model — that no
  configured key decrypts. Named by model, column and row id, never printed.
- ``leasesite.W002``: the stored secrets could not be checked (database unreachable).

E002 reads the database, so it is a database check: like Django's own it runs only when a database
is named — ``check --database default``, ``migrate`` (so a deploy whose keys cannot open the stored
secrets stops at its migrate step), and plain ``manage.py check``, which leasesite's ``check``
command runs as ``check --database default``. It does not run before the other commands: one
undecryptable token must not stop the cron refresh or ``check_health``.

It scans every row (not a sample: one lost secret is what it is for), reading ciphertext in
chunks; decrypting costs about 10 µs a row, so 50,000 rows take well under a second. A database
file that does not exist yet (SQLite) or tables not migrated yet are skipped, not created.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db import DatabaseError, connections, router, transaction

from leasesite.crypto import describe_invalid_keys, invalid_key_positions, secret_decrypts

SECRETS_TAG = "secrets"
CHECK_CHUNK_SIZE = 2_000
MAX_IDS_NAMED = 10


@register(Tags.security, SECRETS_TAG)
def check_encryption_keys(app_configs: Iterable[AppConfig] | None = None, **kwargs: Any) -> list[Error]:
    keys = list(settings.TOKEN_ENCRYPTION_KEYS)
    if not keys:
        return [
            Error(
                "TOKEN_ENCRYPTION_KEYS is empty.",
                hint="Set at least one key: python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'",
                id="leasesite.E001",
            )
        ]
    if invalid_key_positions(keys):
        return [
            Error(
                describe_invalid_keys(keys) + ".",
                hint="Keys are comma-separated; check that none was truncated or wrapped when pasted.",
                id="leasesite.E001",
            )
        ]
    return []


def database_missing(alias: str) -> bool:
    """A SQLite file that does not exist yet: nothing is stored, and connecting would create it."""
    connection = connections[alias]
    if connection.vendor != "sqlite":
        return False
    name = str(connection.settings_dict["NAME"])
    in_memory = name == ":memory:" or "mode=memory" in name
    return not in_memory and not Path(name).exists()


@register(Tags.database, SECRETS_TAG)
def check_stored_secrets(
    app_configs: Iterable[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    chunk_size: int = CHECK_CHUNK_SIZE,
    **kwargs: Any,
) -> list[Error | Warning]:
    from leasesite.keys import ciphertext_chunks, encrypted_columns

    if not databases or invalid_key_positions(settings.TOKEN_ENCRYPTION_KEYS) or not settings.TOKEN_ENCRYPTION_KEYS:
        return []  # no database named, or E001 already says why nothing can be decrypted
    issues: list[Error | Warning] = []
    for alias in databases:
        if database_missing(alias):
            continue
        connection = connections[alias]
        try:
            with connection.cursor() as cursor:
                tables = set(connection.introspection.table_names(cursor))
        except DatabaseError as exc:
            issues.append(_not_checked(alias, "", exc))
            continue
        for column in encrypted_columns(app_configs):
            if column.model._meta.db_table not in tables or not router.allow_migrate_model(alias, column.model):
                continue  # not migrated yet: nothing stored
            try:
                with transaction.atomic(using=alias):  # a savepoint: a failed read leaves no broken transaction
                    undecryptable = [
                        pk
                        for rows in ciphertext_chunks(column, chunk_size=chunk_size, using=alias)
                        for pk, ciphertext, *_fingerprints in rows
                        if ciphertext and not secret_decrypts(ciphertext)
                    ]
            except DatabaseError as exc:  # e.g. the column is added by a migration not applied yet
                issues.append(_not_checked(alias, f" ({column.label})", exc))
                continue
            if undecryptable:
                issues.append(_undecryptable_error(undecryptable, column.field))
    return issues


def _not_checked(alias: str, what: str, exc: DatabaseError) -> Warning:
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return Warning(
        f"Stored secrets{what} were not checked: database {alias!r} cannot be read "
        f"({type(exc).__name__}: {first_line}).",
        id="leasesite.W002",
    )


def _undecryptable_error(row_ids: list, field: object) -> Error:
    named = ", ".join(f"id {pk}" for pk in row_ids[:MAX_IDS_NAMED])
    more = f" and {len(row_ids) - MAX_IDS_NAMED} more" if len(row_ids) > MAX_IDS_NAMED else ""
    return Error(
        f"{len(row_ids)} stored secret(s) cannot be decrypted with any key in "
        f"TOKEN_ENCRYPTION_KEYS (rows {named}{more}).",
        hint="Put back the key that encrypted them (after the new first key) and run rotate_token_keys, "
        "or re-enter these secrets. Until then the code that needs them fails for these rows.",
        obj=field,  # printed as app.Model.field
        id="leasesite.E002",
    )
