"""The client's classification, against a real local HTTP server playing the upstream."""

from __future__ import annotations

import socket
import time

import pytest
from werkzeug.wrappers import Response

from tests.conftest import invalid, json_answer, new_token_value, ok, server_error, throttled
from tokens.clients import BaomingClient, CheckOutcome, classify_response, parse_retry_after


@pytest.fixture
def client(upstream) -> BaomingClient:
    return BaomingClient(base_url=upstream.url, timeout=0.5, pool_size=4)


def check(upstream, client, answer) -> object:
    token = new_token_value()
    upstream.answers[token] = answer
    result = client.check_token(token)
    assert token not in result.message
    return result


def test_ok_answer_is_valid(upstream, client):
    result = check(upstream, client, ok)
    assert result.outcome == CheckOutcome.VALID
    assert result.http_status == 200


def test_probe_sends_token_and_eid(upstream, settings):
    client = BaomingClient(base_url=upstream.url, probe_eid="E123", timeout=0.5)
    token = new_token_value()
    client.check_token(token)
    assert upstream.requests[-1]["path"] == "/xcx/enroll/v2/detail"
    assert upstream.requests[-1]["args"] == {"access_token": token, "eid": "E123"}


def test_without_probe_eid_no_eid_parameter(upstream, client):
    client.check_token(new_token_value())
    assert "eid" not in upstream.requests[-1]["args"]


def test_invalid_access_token_message_is_invalid(upstream, client):
    result = check(upstream, client, invalid)
    assert result.outcome == CheckOutcome.INVALID
    assert "invalid access_token" in result.message


def test_http_401_is_invalid(upstream, client):
    assert check(upstream, client, json_answer({"error": "unauthorized"}, status=401)).outcome == CheckOutcome.INVALID


def test_http_429_with_retry_after_is_rate_limited(upstream, client):
    result = check(upstream, client, json_answer({}, status=429, headers={"Retry-After": "7"}))
    assert result.outcome == CheckOutcome.RATE_LIMITED
    assert result.retry_after == 7


def test_throttle_message_is_rate_limited(upstream, client):
    result = check(upstream, client, throttled)
    assert result.outcome == CheckOutcome.RATE_LIMITED
    assert result.retry_after is None


def test_500_is_transient_even_if_body_says_invalid(upstream, client):
    assert check(upstream, client, server_error).outcome == CheckOutcome.TRANSIENT
    body = json_answer({"sta": -1, "msg": "invalid access_token"}, status=502)
    assert check(upstream, client, body).outcome == CheckOutcome.TRANSIENT


def test_timeout_is_transient(upstream, client):
    def slow() -> Response:
        time.sleep(1.2)
        return ok()

    started = time.monotonic()
    result = check(upstream, client, slow)
    assert result.outcome == CheckOutcome.TRANSIENT
    assert result.message == "timeout"
    assert time.monotonic() - started < 1.2


def test_connection_refused_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        client = BaomingClient(base_url=f"http://127.0.0.1:{port}", timeout=0.5)
        token = new_token_value()
        result = client.check_token(token)
    assert result.outcome == CheckOutcome.TRANSIENT
    assert result.message in {"connection refused", "connection error"}
    assert token not in result.message


def test_non_json_is_transient(upstream, client):
    html = lambda: Response("<html>gateway</html>", status=200, content_type="text/html")  # noqa: E731
    result = check(upstream, client, html)
    assert result.outcome == CheckOutcome.TRANSIENT
    assert "not JSON" in result.message


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2, 3],
        "ok",
        {"msg": "ok", "sta": "0"},
        {"msg": "ok", "sta": True},
        {"msg": 5, "sta": 0},
        {"sta": 1, "msg": "报名未开始"},
        {"data": {}},
        {},
    ],
)
def test_unexpected_json_shapes_are_transient(upstream, client, payload):
    assert check(upstream, client, json_answer(payload)).outcome == CheckOutcome.TRANSIENT


def test_missing_sta_with_ok_message_is_valid():
    assert classify_response(200, {}, b'{"msg": "OK"}').outcome == CheckOutcome.VALID


def test_connection_is_reused(upstream, client):
    for _ in range(5):
        client.check_token(new_token_value())
    pool = next(iter(client.session.adapters["http://"].poolmanager.pools._container.values()))
    assert pool.num_connections == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [("3", 3.0), ("0", 0.0), ("-5", 0.0), ("99999", 300.0), ("soon", None), (None, None)],
)
def test_parse_retry_after(header, expected):
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date():
    from email.utils import formatdate

    seconds = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert 25 <= seconds <= 31


@pytest.mark.parametrize(
    ("status", "body", "answered"),
    [
        (200, b'{"sta": 0, "msg": "ok"}', True),
        (200, b'{"sta": -1, "msg": "invalid access_token"}', True),
        (401, b"", True),
        (200, '{"sta": -1, "msg": "报名未开始"}'.encode(), True),  # a business answer
        (200, '{"sta": -1, "msg": "请求过于频繁，请稍后重试"}'.encode(), False),
        (429, b"", False),
        (502, b"bad gateway", False),
        (200, b"<html>maintenance</html>", False),
        (200, b'{"sta": "0"}', False),
        (404, b'{"sta": -1, "msg": "not found"}', False),
    ],
)
def test_whether_the_upstream_really_answered_about_the_token(status, body, answered):
    assert classify_response(status, {}, body).answered is answered


def test_a_timeout_is_no_answer(upstream, client):
    def slow() -> Response:
        time.sleep(1.0)
        return ok()

    assert check(upstream, client, slow).answered is False
