from __future__ import annotations

import pytest

from tokens.services.refresh import token_refresh_run

pytestmark = pytest.mark.django_db


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_healthz_reports_redis_down(client, settings):
    from leasesite.redis_client import _client

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    _client.cache_clear()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["redis"] == "error"


def test_metrics_export_token_and_run_figures(client, upstream, make_token):
    make_token()
    make_token(consecutive_failures=2)
    token_refresh_run(trigger="command")
    body = client.get("/metrics").content.decode()
    assert 'leasesite_baoming_tokens{state="all"} 2.0' in body
    assert 'leasesite_token_refresh_last_run_tokens{result="ok"} 2.0' in body
    assert "leasesite_token_refresh_last_run_timestamp_seconds" in body


def test_metrics_export_lease_figures(client, provider, make_team, make_lease):
    from datetime import timedelta

    from django.utils import timezone

    team = make_team("alpha", capacity=7)
    make_lease(team)
    make_lease(
        team,
        "active",
        joined_at=timezone.now() - timedelta(days=40),
        expires_at=timezone.now() - timedelta(minutes=1),
    )
    body = client.get("/metrics").content.decode()
    assert 'leasesite_leases{status="pending"} 1.0' in body
    assert 'leasesite_leases{status="active"} 1.0' in body
    assert 'leasesite_leases{status="failed"} 0.0' in body
    assert "leasesite_leases_overdue 1.0" in body
    assert 'leasesite_team_seats{kind="capacity",team="alpha"} 7.0' in body
    assert 'leasesite_team_seats{kind="used",team="alpha"} 2.0' in body
    assert 'leasesite_team_health{health="healthy",pool="default",team="alpha"} 1.0' in body
