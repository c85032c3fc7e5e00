from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_start_prepare_creates_one_admin_login_and_prints_it(settings, tmp_path, capsys):
    settings.VAR_DIR = tmp_path
    call_command("start_prepare")
    out = capsys.readouterr().out
    saved = (tmp_path / "admin-login.txt").read_text()
    password = saved.split("password: ")[1].strip()
    assert f"password: {password}" in out
    assert (tmp_path / "admin-login.txt").stat().st_mode & 0o777 == 0o600
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(password)

    call_command("start_prepare")
    assert "admin login exists" in capsys.readouterr().out
    assert get_user_model().objects.count() == 1


def test_start_refuses_demo_on_a_configured_database(monkeypatch):
    from django.core.management.base import CommandError

    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/real")
    with pytest.raises(CommandError, match="--demo uses its own SQLite database"):
        call_command("start", "--demo")


def test_start_gives_its_processes_a_fresh_shared_metrics_directory(settings, tmp_path):
    from leasesite.management.commands.start import metrics_env

    settings.VAR_DIR = tmp_path
    stale = tmp_path / "metrics" / "local" / "counter_1.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier start")
    env: dict[str, str] = {}
    metrics_env(env)
    assert env["LEASESITE_METRICS_DIR"] == str(tmp_path / "metrics")
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics" / "local")
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir() and not stale.exists()

    chosen = {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}
    metrics_env(chosen)
    assert chosen == {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}
