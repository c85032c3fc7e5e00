"""Model fields for secrets: plaintext in Python, ciphertext in the column."""

from __future__ import annotations

from typing import Any

from django.db import models

from leasesite.crypto import (
    SecretDecryptionError,
    UndecryptableSecret,
    decrypt_secret,
    encrypt_secret,
    fingerprint_secret,
)


class EncryptedTextField(models.TextField):
    """Stores Fernet ciphertext; the attribute on the instance is the plaintext.

    Ciphertext is not deterministic, so this column cannot be searched: look rows up by their
    fingerprint instead. A value no configured key decrypts loads as an ``UndecryptableSecret``
    (falsy; raises ``SecretDecryptionError`` when used as text) instead of failing the whole query,
    and is written back as the same ciphertext. An empty column loads as "".
    """

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> str | UndecryptableSecret | None:
        if value is None:
            return None
        if value == "":
            return ""
        try:
            return decrypt_secret(value)
        except SecretDecryptionError:
            return UndecryptableSecret(value)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, UndecryptableSecret):
            return value
        return super().to_python(value)

    def get_prep_value(self, value: Any) -> str | None:
        if isinstance(value, UndecryptableSecret):
            return value.ciphertext  # unchanged, so the key that encrypted it can still open it
        value = super().get_prep_value(value)
        if value is None:
            return None
        return encrypt_secret(str(value))

    def value_to_string(self, obj: models.Model) -> str:
        # Serialization (dumpdata) keeps ciphertext, never plaintext.
        return self.get_prep_value(self.value_from_object(obj)) or ""


class FingerprintField(models.CharField):
    """A keyed hash of another field, computed whenever the row is written."""

    def __init__(self, *args: Any, source: str = "", **kwargs: Any) -> None:
        self.source = source
        kwargs.setdefault("max_length", 64)
        kwargs.setdefault("editable", False)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple:
        name, path, args, kwargs = super().deconstruct()
        kwargs["source"] = self.source
        kwargs.pop("editable", None)
        if kwargs.get("max_length") == 64:
            kwargs.pop("max_length")
        return name, path, args, kwargs

    def pre_save(self, model_instance: models.Model, add: bool) -> str:
        plaintext = getattr(model_instance, self.source)
        if isinstance(plaintext, UndecryptableSecret):
            return getattr(model_instance, self.attname)  # cannot recompute: keep the stored one
        value = fingerprint_secret(plaintext) if plaintext else ""
        setattr(model_instance, self.attname, value)
        return value
