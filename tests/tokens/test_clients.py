"""The client's classification, against a real local HTTP server playing the upstream."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from werkzeug.wrappers import Response

from tests.conftest import invalid, json_answer, new_token_value, ok, server_error, throttled
from tokens.clients import BaomingClient, CheckOutcome, classify_response, get_baoming_client, parse_retry_after


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


def test_the_probe_is_the_old_tools_call_exactly(upstream):
    """GET /xcx/enroll/v3/detail?eid=69844bcf8eaa2449c7a37fae&access_token=...&referer=&spider=h5,
    as the old tool's ``get_enroll_detail`` made it (the defaults of the settings)."""
    token = new_token_value()
    result = get_baoming_client().check_token(token)
    assert result.outcome == CheckOutcome.VALID
    request = upstream.requests[-1]
    assert request["path"] == "/xcx/enroll/v3/detail"
    assert request["args"] == {
        "eid": "69844bcf8eaa2449c7a37fae",
        "access_token": token,
        "referer": "",
        "spider": "h5",
    }
    assert "referer=&" in request["query"] + "&"  # sent, and empty


def test_probe_path_and_eid_come_from_the_settings(upstream, settings):
    upstream.server.expect_request("/xcx/enroll/v4/detail").respond_with_handler(upstream.handle)
    settings.BAOMING_PROBE_PATH = "/xcx/enroll/v4/detail"
    settings.BAOMING_PROBE_EID = "E123"
    token = new_token_value()
    get_baoming_client().check_token(token)
    assert upstream.requests[-1]["path"] == "/xcx/enroll/v4/detail"
    assert upstream.requests[-1]["args"] == {"eid": "E123", "access_token": token, "referer": "", "spider": "h5"}


def test_the_token_never_appears_in_logs_or_messages(upstream, caplog):
    """urllib3 logs whole URLs at DEBUG (the token is a query parameter): with the project's
    logging set-up every record reaches the log with the token masked, and what the client
    returns never holds it, even when the upstream echoes it back."""
    token = new_token_value()
    upstream.answers[token] = json_answer({"sta": -1, "msg": f"登录已过期 access_token={token}"})
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="urllib3"):
        result = get_baoming_client().check_token(token)
    assert result.outcome == CheckOutcome.SUSPECT
    assert token not in result.message and "登录已过期" in result.message
    urls = [r for r in caplog.records if r.name.startswith("urllib3") and "/xcx/enroll/v3/detail" in r.getMessage()]
    assert urls  # urllib3 did log the request line
    assert f"{token[:4]}…{token[-4:]}" in urls[0].getMessage()
    for record in caplog.records:
        assert token not in record.getMessage(), record.name
    assert token not in caplog.text


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
        {"sta": 1, "msg": "报名未开始"},
        {"sta": -1, "msg": "活动名额已满"},
        {"sta": -1, "msg": ["登录已过期"]},
        {"data": {}},
        {},
    ],
)
def test_unexpected_json_shapes_are_transient(upstream, client, payload):
    assert check(upstream, client, json_answer(payload)).outcome == CheckOutcome.TRANSIENT


@pytest.mark.parametrize(
    "payload",
    [
        {"sta": 0, "msg": "未找到已有报名记录", "data": None},  # a valid token not enrolled in the event
        {"sta": 0, "msg": "ok", "data": {"info_id": "", "title": "t"}},
        {"sta": 0, "msg": "OK"},
        {"sta": 0, "msg": ""},
        {"sta": 0},
        {"sta": 0, "msg": 5},
        {"sta": 0, "msg": "登录已过期"},
        {"sta": 0, "msg": "invalid access_token"},
    ],
)
def test_sta_zero_is_valid_whatever_the_message(upstream, client, payload):
    result = check(upstream, client, json_answer(payload))
    assert (result.outcome, result.answered) == (CheckOutcome.VALID, True)


def test_not_enrolled_answer_keeps_its_message(upstream, client):
    result = check(upstream, client, json_answer({"sta": 0, "msg": "未找到已有报名记录", "data": None}))
    assert result.message == "未找到已有报名记录"


@pytest.mark.parametrize(
    "payload",
    [
        {"sta": -1, "msg": "登录已过期，请重新登录", "data": None},
        {"sta": 1001, "msg": "请先登录"},
        {"sta": -500, "msg": "Token expired"},  # compared case-insensitively, like the old tool
        {"sta": -1, "msg": "凭证失效"},
        {"sta": -1, "msg": "无效的用户"},
        {"sta": -2, "msg": "会话过期"},
    ],
)
def test_a_failing_answer_holding_a_suspect_word_is_suspect(upstream, client, payload):
    result = check(upstream, client, json_answer(payload))
    assert (result.outcome, result.answered) == (CheckOutcome.SUSPECT, True)
    assert payload["msg"] in result.message


def test_invalid_access_token_stays_invalid_though_it_holds_the_word_token(upstream, client):
    for sta in (-1, -500):
        result = check(upstream, client, json_answer({"sta": sta, "msg": "invalid access_token"}))
        assert result.outcome == CheckOutcome.INVALID


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (403, {"sta": -1, "msg": "登录已过期"}),  # not an HTTP 200 answer: transient
        (200, {"msg": "登录已过期"}),  # no sta
        (200, {"sta": "-1", "msg": "登录已过期"}),  # sta not an integer
    ],
)
def test_a_suspect_word_outside_a_200_answer_with_an_integer_sta_is_transient(upstream, client, status, payload):
    assert check(upstream, client, json_answer(payload, status=status)).outcome == CheckOutcome.TRANSIENT


def test_suspect_words_are_configurable(upstream, settings):
    settings.BAOMING_SUSPECT_MESSAGES = ["会话结束"]
    client = get_baoming_client()
    logged_out, expired = new_token_value(), new_token_value()
    upstream.answers[logged_out] = json_answer({"sta": -1, "msg": "会话结束，请重新扫码"})
    upstream.answers[expired] = json_answer({"sta": -1, "msg": "登录已过期"})
    assert client.check_token(logged_out).outcome == CheckOutcome.SUSPECT
    assert client.check_token(expired).outcome == CheckOutcome.TRANSIENT


def test_classification_takes_the_suspect_words():
    body = b'{"sta": -1, "msg": "Session ENDED"}'
    assert classify_response(200, {}, body, suspect_words=("session ended",)).outcome == CheckOutcome.SUSPECT
    assert classify_response(200, {}, body, suspect_words=()).outcome == CheckOutcome.TRANSIENT


def test_missing_sta_with_ok_message_is_valid():
    assert classify_response(200, {}, b'{"msg": "OK"}').outcome == CheckOutcome.VALID


def test_connection_is_reused(upstream, client):
    for _ in range(5):
        client.check_token(new_token_value())
    # The keep-alive check's own urllib3 pool (the session's way is taken only behind a proxy).
    assert client._check_pool.num_connections == 1


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
        (200, '{"sta": 0, "msg": "未找到已有报名记录", "data": null}'.encode(), True),
        (200, '{"sta": -1, "msg": "登录已过期"}'.encode(), True),  # suspect
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


def test_a_proxy_in_the_environment_is_still_honoured(upstream, monkeypatch):
    """The keep-alive check skips requests' per-call layers (issue 11), but not the environment:
    with a proxy configured for the upstream it goes through the session, i.e. the proxy."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    proxied = BaomingClient(base_url=upstream.url, timeout=1)
    assert proxied._check_pool is None
    result = proxied.check_token(new_token_value())
    assert result.outcome == CheckOutcome.TRANSIENT
    assert upstream.requests == []  # it went to the (dead) proxy, not straight to the upstream
    monkeypatch.delenv("HTTP_PROXY")
    direct = BaomingClient(base_url=upstream.url, timeout=1)
    assert direct._check_pool is not None
    assert direct.check_token(new_token_value()).outcome == CheckOutcome.VALID


def test_the_latency_estimate_follows_the_checks(upstream, client):
    assert client.latency is None
    for _ in range(3):
        client.check_token(new_token_value())
    assert client.latency is not None and 0 < client.latency < 2
