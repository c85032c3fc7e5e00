"""Alerts go through Apprise to real endpoints; a dead endpoint never breaks the caller."""

from __future__ import annotations

import json

import pytest
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
