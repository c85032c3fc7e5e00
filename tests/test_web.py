from __future__ import annotations

import pytest

from tokens.services.refresh import token_refresh_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def scrape(client, settings):
    """GET /metrics as Prometheus does in production: with the bearer token."""
    settings.METRICS_TOKEN = "test-metrics-token"
    return lambda: client.get("/metrics", HTTP_AUTHORIZATION="Bearer test-metrics-token").content.decode()


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


def test_metrics_export_token_and_run_figures(scrape, upstream, make_token):
    make_token()
    make_token(consecutive_failures=2)
    token_refresh_run(trigger="command")
    body = scrape()
    assert 'leasesite_baoming_tokens{state="all"} 2.0' in body
    assert 'leasesite_token_refresh_last_run_tokens{result="ok"} 2.0' in body
    assert "leasesite_token_refresh_last_run_timestamp_seconds" in body


def test_metrics_export_lease_figures(scrape, provider, make_team, make_lease):
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
    body = scrape()
    assert 'leasesite_leases{status="pending"} 1.0' in body
    assert 'leasesite_leases{status="active"} 1.0' in body
    assert 'leasesite_leases{status="failed"} 0.0' in body
    assert "leasesite_leases_overdue 1.0" in body
    assert 'leasesite_team_seats{kind="capacity",team="alpha"} 7.0' in body
    assert 'leasesite_team_seats{kind="used",team="alpha"} 2.0' in body
    assert 'leasesite_team_health{health="healthy",pool="default",team="alpha"} 1.0' in body
