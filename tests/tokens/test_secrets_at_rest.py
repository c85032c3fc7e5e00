"""Tokens are encrypted in the column, fingerprinted, masked, and rotate to new keys."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import IntegrityError, connection

from leasesite.crypto import _multifernet, mask_secret
from leasesite.log_filters import scrub_secrets
from tokens.models import BaomingToken

pytestmark = pytest.mark.django_db
TOKEN = "9a8bb3f233aa4de4b3209b47d5ac0efe"


def raw_column(pk: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT token FROM tokens_baomingtoken WHERE id = %s", [pk])
        return cursor.fetchone()[0]


def test_plaintext_never_reaches_the_database():
    stored = BaomingToken.objects.create(card_name="张三", user_name="z", token=TOKEN)
    ciphertext = raw_column(stored.pk)
    assert TOKEN not in ciphertext and ciphertext.startswith("gAAAA")
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM tokens_baomingtoken")
        assert TOKEN not in repr(cursor.fetchall())
    assert BaomingToken.objects.get(pk=stored.pk).token == TOKEN
    assert len(stored.fingerprint) == 64 and TOKEN not in stored.fingerprint


def test_same_token_cannot_be_stored_twice():
    BaomingToken.objects.create(card_name="a", token=TOKEN)
    with pytest.raises(IntegrityError):
        BaomingToken.objects.create(card_name="b", token=TOKEN)


def test_masking_and_str():
    stored = BaomingToken.objects.create(card_name="张三", user_name="z", token=TOKEN)
    assert stored.masked_token == "9a8b…0efe" == mask_secret(TOKEN)
    assert TOKEN not in str(stored) and TOKEN not in repr(stored)


def test_scrub_filter_masks_tokens_in_log_records(caplog):
    logger = logging.getLogger("leasesite.test")
    with caplog.at_level(logging.INFO):
        logger.info("GET /x?access_token=%s&eid=1 failed", TOKEN)
    assert scrub_secrets(f"url?access_token={TOKEN}") == "url?access_token=9a8b…0efe"
    from leasesite.log_filters import SecretScrubFilter

    record = caplog.records[-1]
    SecretScrubFilter().filter(record)
    assert TOKEN not in record.getMessage() and "9a8b…0efe" in record.getMessage()


def test_rotate_token_keys_reencrypts_with_the_new_first_key(settings, capsys):
    stored = BaomingToken.objects.create(card_name="a", token=TOKEN)
    old_key = settings.TOKEN_ENCRYPTION_KEYS[0]
    old_ciphertext = raw_column(stored.pk)
    new_key = Fernet.generate_key().decode()
    settings.TOKEN_ENCRYPTION_KEYS = [new_key, old_key]
    _multifernet.cache_clear()

    call_command("rotate_token_keys")
    assert "re-encrypted 1" in capsys.readouterr().out
    rotated = raw_column(stored.pk)
    assert rotated != old_ciphertext
    assert Fernet(new_key.encode()).decrypt(rotated.encode()).decode() == TOKEN

    settings.TOKEN_ENCRYPTION_KEYS = [new_key]  # the old key can now be dropped
    assert BaomingToken.objects.get(pk=stored.pk).token == TOKEN
    call_command("rotate_token_keys")
    assert "re-encrypted 0" in capsys.readouterr().out


def test_rotation_without_the_old_key_fails_clearly(settings):
    from django.core.management.base import CommandError

    BaomingToken.objects.create(card_name="a", token=TOKEN)
    settings.TOKEN_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(CommandError, match="keep the old key"):
        call_command("rotate_token_keys")
