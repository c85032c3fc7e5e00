from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from leasesite.env import env_bool, env_float, env_int, env_list, parse_database_url

BASE = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("TRUE", True), ("on", True), ("0", False), ("no", False), ("", False)]
)
def test_env_bool(raw, expected):
    assert env_bool("X", not expected, environ={"X": raw}) is expected
    assert env_bool("X", True, environ={}) is True


def test_env_bool_rejects_typos():
    with pytest.raises(ImproperlyConfigured, match="X must be a boolean"):
        env_bool("X", False, environ={"X": "flase"})


def test_env_numbers():
    assert env_int("N", 8, environ={"N": " 3 "}) == 3
    with pytest.raises(ImproperlyConfigured, match="must be an integer"):
        env_int("N", 8, environ={"N": "eight"})
    with pytest.raises(ImproperlyConfigured, match=">= 1"):
        env_int("N", 8, minimum=1, environ={"N": "0"})
    assert env_float("R", 1.0, environ={"R": "2.5"}) == 2.5
    with pytest.raises(ImproperlyConfigured, match="> 0"):
        env_float("R", 1.0, minimum=0, exclusive_minimum=True, environ={"R": "0"})
    with pytest.raises(ImproperlyConfigured, match="finite"):
        env_float("R", 1.0, environ={"R": "nan"})
    assert env_list("L", environ={"L": "a, b,,c"}) == ["a", "b", "c"]


def test_parse_database_url(tmp_path):
    pg = parse_database_url("postgres://u:p%40ss@db.example:5433/leases?sslmode=require", base_dir=tmp_path)
    assert (pg["ENGINE"], pg["NAME"], pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"]) == (
        "django.db.backends.postgresql",
        "leases",
        "u",
        "p@ss",
        "db.example",
        "5433",
    )
    assert pg["OPTIONS"] == {"sslmode": "require"}
    relative = parse_database_url("sqlite:///var/x.sqlite3", base_dir=tmp_path)
    assert relative["NAME"] == str(tmp_path / "var" / "x.sqlite3")
    assert parse_database_url("sqlite:////abs/x.sqlite3", base_dir=tmp_path)["NAME"] == "/abs/x.sqlite3"
    with pytest.raises(ImproperlyConfigured, match="not supported"):
        parse_database_url("mysql://x/y", base_dir=tmp_path)
    with pytest.raises(ImproperlyConfigured, match="must name a database"):
        parse_database_url("postgres://localhost/", base_dir=tmp_path)


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TOKEN_", "BAOMING_"))}
    clean.update({"DJANGO_SETTINGS_MODULE": "leasesite.settings", "LEASESITE_VAR_DIR": "/tmp/leasesite-check", **env})
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args], cwd=BASE, env=clean, capture_output=True, text=True, timeout=120
    )


def test_production_refuses_to_start_without_secret_key():
    result = run_check({"DJANGO_DEBUG": "false"})
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_production_refuses_to_start_without_encryption_keys():
    result = run_check({"DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": "x" * 50})
    assert result.returncode != 0
    assert "TOKEN_ENCRYPTION_KEYS is required" in result.stderr


def test_debug_derives_a_dev_key_with_a_warning():
    result = run_check({"DJANGO_DEBUG": "true"})
    assert result.returncode == 0, result.stderr
    assert "TOKEN_ENCRYPTION_KEYS is not set" in result.stderr


def test_malformed_setting_is_an_error():
    result = run_check({"BAOMING_RATE_LIMIT": "fast"})
    assert result.returncode != 0
    assert "BAOMING_RATE_LIMIT must be a number" in result.stderr
