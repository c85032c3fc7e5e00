"""Alerts go through Apprise to real endpoints; a dead endpoint never breaks the caller."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from pytest_httpserver import HTTPServer

from leasesite.notify import alert_send

TOKEN = "9a8bb3f233aa4de4b3209b47d5ac0efe"


@pytest.fixture
def receiver():
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    server.expect_request("/alerts", method="POST").respond_with_data("ok")
    yield server
    server.clear()
    server.stop()


def test_alert_is_delivered_with_secrets_masked(receiver, settings):
    settings.NOTIFY_URLS = [f"json://127.0.0.1:{receiver.port}/alerts"]
    assert alert_send(title="breaker tripped", body=f"token access_token={TOKEN} said invalid", level="error")
    request, _ = receiver.log[0]
    payload = json.loads(request.data)
    assert payload["title"] == "breaker tripped"
    assert "9a8b…0efe" in payload["message"] and TOKEN not in payload["message"]


def test_undeliverable_alert_is_logged_not_raised(settings, caplog):
    settings.NOTIFY_URLS = ["json://127.0.0.1:9/alerts"]
    assert alert_send(title="t", body="b") is False
    assert "alert delivery failed" in caplog.text


def test_without_targets_alerts_are_only_logged(settings, caplog):
    settings.NOTIFY_URLS = []
    assert alert_send(title="run failed", body="details")
    assert "ALERT run failed: details" in caplog.text


# -- flips and de-duplication (leasesite.AlertState) ---------------------------------------------------
from leasesite.notify import alert_is_active, alert_problem, alert_resolved  # noqa: E402


def _sent(receiver) -> list[dict]:
    return [json.loads(request.data) for request, _ in receiver.log]


@pytest.mark.django_db
def test_problem_alerts_once_when_it_starts_and_resolved_once_when_it_ends(receiver, settings):
    settings.NOTIFY_URLS = [f"json://127.0.0.1:{receiver.port}/alerts"]
    settings.ALERT_DEDUP_SECONDS = 0
    assert alert_problem(key="team:1:sync", title="sync failing", body="HTTP 500")
    for _ in range(5):
        assert not alert_problem(key="team:1:sync", title="sync failing", body="HTTP 500")
    assert alert_is_active("team:1:sync")
    assert alert_resolved(key="team:1:sync", title="sync failing")
    assert not alert_resolved(key="team:1:sync", title="sync failing")
    titles = [p["title"] for p in _sent(receiver)]
    assert titles == ["sync failing", "已恢复：sync failing"]
    assert not alert_is_active("team:1:sync")


@pytest.mark.django_db
def test_a_flapping_problem_is_not_announced_again_within_the_dedup_window(receiver, settings):
    settings.NOTIFY_URLS = [f"json://127.0.0.1:{receiver.port}/alerts"]
    settings.ALERT_DEDUP_SECONDS = 3600
    assert alert_problem(key="k", title="down", body="")
    assert alert_resolved(key="k", title="down")
    assert not alert_problem(key="k", title="down", body="")  # started again 0 s later
    assert not alert_resolved(key="k", title="down")  # its start was not announced either
    assert len(receiver.log) == 2


@pytest.mark.django_db
def test_one_off_alerts_with_a_key_are_sent_at_most_once_per_window(receiver, settings, time_machine):
    settings.NOTIFY_URLS = [f"json://127.0.0.1:{receiver.port}/alerts"]
    settings.ALERT_DEDUP_SECONDS = 600
    assert alert_send(title="t", body="b", key="lease:1:failed")
    assert not alert_send(title="t", body="b", key="lease:1:failed")
    assert alert_send(title="t", body="b", key="lease:2:failed")
    time_machine.move_to(timezone.now() + timedelta(seconds=601))
    assert alert_send(title="t", body="b", key="lease:1:failed")
    assert len(receiver.log) == 3


@pytest.mark.django_db(transaction=True)
def test_concurrent_callers_announce_a_problem_once(receiver, settings):
    """Threads (own database connections) racing on one key: exactly one sends."""
    import threading

    from django.db import connection

    settings.NOTIFY_URLS = [f"json://127.0.0.1:{receiver.port}/alerts"]
    barrier = threading.Barrier(6)
    results: list[bool] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(alert_problem(key="race", title="x", body=""))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    assert len(receiver.log) == 1
