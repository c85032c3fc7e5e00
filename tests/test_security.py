"""Production defaults, /metrics access, the public root and the favicon."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from tests.test_settings_env import run_check

PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "k" * 30 + "-production-secret-key-0123456789",
    "DJANGO_ALLOWED_HOSTS": "leases.example.com",
}


def test_production_defaults_pass_the_deploy_check_at_warning_level(tmp_path):
    # A database of its own: the deploy check also reads the stored secrets, and the caller's
    # DATABASE_URL (CI's PostgreSQL database) need not exist outside the test run.
    result = run_check(
        {
            **PRODUCTION,
            "TOKEN_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        },
        "--deploy",
        "--fail-level",
        "WARNING",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_switching_the_https_redirect_off_is_reported_by_the_deploy_check(tmp_path):
    """The switch for TLS ended elsewhere is real: Django's deploy check then names what is off."""
    result = run_check(
        {
            **PRODUCTION,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "TOKEN_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "DJANGO_SECURE_SSL_REDIRECT": "false",
            "DJANGO_HSTS_SECONDS": "0",
        },
        "--deploy",
        "--fail-level",
        "WARNING",
    )
    assert result.returncode != 0
    assert "security.W008" in result.stderr + result.stdout
    assert "security.W004" in result.stderr + result.stdout


@pytest.mark.django_db
def test_metrics_with_a_token_needs_the_bearer(client, settings):
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    settings.DEBUG = False
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-metrics-token").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token")
    assert response.status_code == 200
    assert b"leasesite_baoming_tokens" in response.content


@pytest.mark.django_db
def test_metrics_without_a_token_answer_only_in_debug(client, settings):
    settings.METRICS_TOKEN = ""
    settings.DEBUG = False
    response = client.get("/metrics")
    assert response.status_code == 403
    assert b"METRICS_TOKEN" in response.content
    settings.DEBUG = True
    assert client.get("/metrics").status_code == 200


def test_the_root_redirects_to_the_redeem_page(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/redeem/"


def test_favicon_is_served_and_linked(client, db):
    response = client.get("/favicon.ico")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/svg+xml"
    assert response.content.startswith(b"<svg")
    assert b'rel="icon"' in client.get("/redeem/").content
    assert b'rel="icon"' in client.get("/admin/login/").content


def test_the_admin_has_our_own_title(client, db):
    body = client.get("/admin/login/").content.decode()
    assert "leasesite 控制台" in body
    assert "Django 管理" not in body


def _login(client, password, address="10.1.2.3"):
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": "operator", "password": password},
        REMOTE_ADDR=address,
    )


@pytest.mark.django_db
def test_admin_login_locks_a_user_and_address_after_repeated_failures(client, django_user_model, settings, caplog):
    django_user_model.objects.create_user("operator", password="right-password-123", is_staff=True)
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(client, "wrong").status_code == 200  # the login form again, with its error
    locked = _login(client, "wrong")
    assert locked.status_code == 429
    lockouts = [record.getMessage() for record in caplog.records if "Locking out" in record.getMessage()]
    assert len(lockouts) == 1 and "operator" in lockouts[0] and "10.1.2.3" in lockouts[0]
    assert not any("wrong" in record.getMessage() for record in caplog.records)  # no password logged
    # Now even the right password is refused from that address, with a translated page ...
    refused = _login(client, "right-password-123")
    assert refused.status_code == 429
    body = refused.content.decode()
    assert "登录已锁定" in body and "15 分钟" in body
    assert "_auth_user_id" not in client.session
    # ... while the same person from another address logs in: a guesser cannot lock the operator out.
    other = _login(client, "right-password-123", address="10.9.9.9")
    assert other.status_code == 302 and other["Location"] == "/admin/"


@pytest.mark.django_db
def test_a_successful_login_resets_the_failure_count(client, django_user_model, settings):
    django_user_model.objects.create_user("operator", password="right-password-123", is_staff=True)
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, "wrong")
    assert _login(client, "right-password-123").status_code == 302
    client.logout()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(client, "wrong").status_code == 200
    assert _login(client, "right-password-123").status_code == 302


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"REMOTE_ADDR": "10.1.2.3"}, "10.1.2.3"),
        ({"REMOTE_ADDR": "::1"}, "::1"),
        ({}, None),  # force_login, a shell: no address at all
        ({"REMOTE_ADDR": "not-an-address"}, None),
    ],
)
def test_the_login_throttle_records_only_real_addresses(rf, meta, expected):
    from leasesite.clientip import login_client_address

    request = rf.get("/admin/login/")
    request.META.pop("REMOTE_ADDR", None)
    request.META.update(meta)
    assert login_client_address(request) == expected


def test_a_login_without_an_address_is_recorded_on_every_database(client, django_user_model):
    """force_login has no REMOTE_ADDR; PostgreSQL's inet column refused axes' old ``unknown``."""
    from axes.models import AccessLog

    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123456")
    client.force_login(user)
    assert AccessLog.objects.filter(username="root", ip_address=None).exists()
    assert client.get("/admin/").status_code == 200
