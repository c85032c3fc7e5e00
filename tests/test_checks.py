"""``manage.py check`` fails on a malformed key in TOKEN_ENCRYPTION_KEYS (leasesite.E001) and on
stored secrets that no configured key decrypts (leasesite.E002); the database part copes with a
database that is missing, unreachable or not migrated yet."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.core.management.base import BaseCommand, SystemCheckError
from django.db import connection

from tests.lease_fixtures import TEAM_TOKEN

REPO = Path(__file__).resolve().parent.parent
GOOD_KEY = Fernet.generate_key().decode()


def check_output(**options: object) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("check", stdout=out, stderr=err, **options)
    return out.getvalue() + err.getvalue()


def foreign_ciphertext(plaintext: str) -> str:
    return Fernet(Fernet.generate_key()).encrypt(plaintext.encode()).decode()


# -- E001: the keys themselves ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad_key",
    [
        "not-a-fernet-key",
        "c2hvcnQ=",  # valid base64, 5 bytes
        Fernet.generate_key().decode()[:-2],  # truncated when pasted
    ],
)
def test_check_fails_on_a_malformed_key_and_names_its_position(settings, bad_key):
    settings.TOKEN_ENCRYPTION_KEYS = [GOOD_KEY, bad_key]
    with pytest.raises(SystemCheckError) as raised:
        check_output()
    message = str(raised.value)
    assert "leasesite.E001" in message
    assert "key 2 of 2" in message
    assert bad_key not in message and GOOD_KEY not in message


def test_check_fails_without_any_key(settings):
    settings.TOKEN_ENCRYPTION_KEYS = []
    with pytest.raises(SystemCheckError, match=r"leasesite\.E001"):
        check_output()


def test_malformed_key_at_first_use_names_its_position_too(settings):
    from django.core.exceptions import ImproperlyConfigured

    from leasesite.crypto import encrypt_secret

    settings.TOKEN_ENCRYPTION_KEYS = ["oops", GOOD_KEY]
    with pytest.raises(ImproperlyConfigured, match="key 1 of 2") as raised:
        encrypt_secret("x")
    assert "oops" not in str(raised.value)


@pytest.mark.django_db
def test_check_passes_with_good_keys(settings):
    settings.TOKEN_ENCRYPTION_KEYS = [GOOD_KEY, Fernet.generate_key().decode()]
    assert "no issues" in check_output()


# -- E002: stored secrets --------------------------------------------------------------------------------
@pytest.mark.django_db
def test_check_fails_when_a_stored_team_token_cannot_be_decrypted(make_team):
    good = make_team("good")
    lost = make_team("lost")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE leases_team SET api_token = %s WHERE id = %s", [foreign_ciphertext(TEAM_TOKEN), lost.pk])

    with pytest.raises(SystemCheckError) as raised:
        check_output()
    message = str(raised.value)
    assert "leasesite.E002" in message
    assert "leases.Team.api_token" in message and f"id {lost.pk}" in message
    assert f"id {good.pk}" not in message
    assert TEAM_TOKEN not in message


@pytest.mark.django_db
def test_check_fails_when_a_stored_token_cannot_be_decrypted_and_counts_them(make_token):
    tokens = [make_token() for _ in range(15)]
    with connection.cursor() as cursor:
        for token in tokens[:12]:
            cursor.execute(
                "UPDATE tokens_baomingtoken SET token = %s WHERE id = %s", [foreign_ciphertext(token.token), token.pk]
            )
    with pytest.raises(SystemCheckError) as raised:
        check_output()
    message = str(raised.value)
    assert "tokens.BaomingToken.token: (leasesite.E002) 12 stored secret(s)" in message
    assert "and 2 more" in message  # the first ten ids are named


@pytest.mark.django_db
def test_check_passes_when_every_stored_secret_decrypts(settings, make_team, make_token):
    make_team("alpha")
    make_team("empty", api_token="")
    make_token()
    settings.TOKEN_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), *settings.TOKEN_ENCRYPTION_KEYS]  # mid-rotation
    assert "no issues" in check_output()


@pytest.mark.django_db
def test_check_reads_secrets_in_chunks_not_row_by_row(make_token, django_assert_max_num_queries):
    from leasesite.checks import check_stored_secrets

    for _ in range(300):
        make_token()
    with django_assert_max_num_queries(20):  # row by row would be 300+
        assert check_stored_secrets(databases=["default"], chunk_size=100) == []


@pytest.mark.django_db
def test_other_commands_do_not_scan_the_database(make_team):
    """Only ``check`` (and ``check --database``, ``migrate``) reads stored secrets: one
    undecryptable row must not stop every management command (cron refreshes, check_health)."""
    lost = make_team("lost")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE leases_team SET api_token = %s WHERE id = %s", [foreign_ciphertext("x"), lost.pk])
    BaseCommand().check()  # what every command runs before handle(): no SystemCheckError


# -- no database, unreachable database, not migrated ------------------------------------------------------
def manage_check(database_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATABASE_URL=database_url, DJANGO_SETTINGS_MODULE="leasesite.settings")
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_check_without_a_database_file_neither_fails_nor_creates_it(tmp_path):
    missing = tmp_path / "nothing-here.sqlite3"
    result = manage_check(f"sqlite:///{missing}")
    assert result.returncode == 0, result.stderr
    assert not missing.exists()


def test_check_with_an_unmigrated_database_passes(tmp_path):
    empty = tmp_path / "empty.sqlite3"
    import sqlite3

    sqlite3.connect(empty).close()
    result = manage_check(f"sqlite:///{empty}")
    assert result.returncode == 0, result.stderr


def test_check_with_an_unreachable_database_warns_instead_of_crashing():
    result = manage_check("postgres://postgres@127.0.0.1:1/leasesite_nowhere")
    assert result.returncode == 0, result.stderr
    assert "leasesite.W002" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
