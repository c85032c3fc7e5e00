"""The client's QR-login calls (pc_code, pc_login) against real local HTTP servers: the bundled
fake for the normal flow, a scripted server for what the fake never answers."""

from __future__ import annotations

import base64
import socket

import pytest
import segno

from leasesite.fakes.baoming_server import fake_qr_scan
from tests.tokens import qr_fixtures
from tests.tokens.qr_fixtures import answer
from tokens.clients import (
    BaomingClient,
    QrCodeError,
    QrPollOutcome,
    classify_qr_login_answer,
    normalize_qrcode,
)

# The QR fixtures (a module of their own, not tests/conftest.py).
fake_baoming = qr_fixtures.fake_baoming
qr_upstream = qr_fixtures.qr_upstream
TOKEN = "9a8bb3f233aa4de4b3209b47d5ac0efe"
LOGGED_IN = {
    "sta": 0,
    "msg": "ok",
    "data": {"access_token": TOKEN, "uname": "小明", "pic": "https://example.com/a.png", "unionid": "o-abc"},
}


def client_for(url: str) -> BaomingClient:
    return BaomingClient(base_url=url, timeout=1.0, pool_size=2)


def test_fake_flow_waiting_then_scanned_then_used_up(fake_baoming):
    client = client_for(fake_baoming.url)
    qr = client.qr_code()
    assert qr.qrcode.startswith("https://") and not qr.is_picture
    assert qr.code not in repr(qr)  # the login code is a secret

    assert client.qr_login_poll(qr.code).outcome == QrPollOutcome.WAITING
    fake_qr_scan(base_url=fake_baoming.url, code=qr.code, details={"uname": "小明", "unionid": "o-1"})
    result = client.qr_login_poll(qr.code)
    assert result.outcome == QrPollOutcome.LOGGED_IN
    assert (result.identity.uname, result.identity.unionid) == ("小明", "o-1")
    assert result.identity.pic.startswith("https://")
    assert len(result.identity.access_token) == 32
    assert result.identity.access_token not in repr(result)

    # The code was collected: the upstream now says it is no longer valid.
    assert client.qr_login_poll(qr.code).outcome == QrPollOutcome.REFUSED


def test_fake_code_expires(settings):
    from leasesite.fakes.baoming_server import FakeBaomingServer

    with FakeBaomingServer(qr_lifetime=0.0) as server:
        client = client_for(server.url)
        qr = client.qr_code()
        result = client.qr_login_poll(qr.code)
    assert result.outcome == QrPollOutcome.REFUSED
    assert "sta=-2" in result.message


def test_fake_picture_answer_is_a_checked_data_image():
    from leasesite.fakes.baoming_server import FakeBaomingServer

    with FakeBaomingServer(qr_picture=True) as server:
        qr = client_for(server.url).qr_code()
    assert qr.is_picture and qr.qrcode.startswith("data:image/png;base64,")
    assert base64.b64decode(qr.qrcode.split(",", 1)[1]).startswith(b"\x89PNG")


def test_poll_sends_the_code_and_source_h5(qr_upstream):
    client_for(qr_upstream.url).qr_login_poll("the-code")
    assert qr_upstream.requests[-1]["path"] == "/xcx/enroll_web/v1/pc_login"
    assert qr_upstream.requests[-1]["args"] == {"code": "the-code", "source": "h5"}


@pytest.mark.parametrize(
    ("payload", "status", "outcome"),
    [
        ({"sta": -1, "msg": "等待扫码"}, 200, QrPollOutcome.WAITING),
        ({"msg": "please wait"}, 200, QrPollOutcome.WAITING),  # the older answer, no sta
        ({"sta": 1, "msg": "please wait"}, 200, QrPollOutcome.WAITING),
        (LOGGED_IN, 200, QrPollOutcome.LOGGED_IN),
        ({"sta": -2, "msg": "二维码已过期"}, 200, QrPollOutcome.REFUSED),
        ({"sta": 403, "msg": "refused"}, 200, QrPollOutcome.REFUSED),
        # garbage: keep waiting
        ({"sta": 0, "msg": "ok", "data": {"access_token": "not-a-token"}}, 200, QrPollOutcome.NO_ANSWER),
        ({"sta": 0, "msg": "ok", "data": None}, 200, QrPollOutcome.NO_ANSWER),
        ({"sta": "0", "msg": "ok"}, 200, QrPollOutcome.NO_ANSWER),
        ({"sta": True, "msg": "x"}, 200, QrPollOutcome.NO_ANSWER),
        ([1, 2, 3], 200, QrPollOutcome.NO_ANSWER),
        ("<html>maintenance</html>", 200, QrPollOutcome.NO_ANSWER),
        ({"sta": -1, "msg": "请求过于频繁，请稍后重试"}, 200, QrPollOutcome.NO_ANSWER),
        ({"sta": -2, "msg": "gone"}, 502, QrPollOutcome.NO_ANSWER),
        ({}, 429, QrPollOutcome.NO_ANSWER),
        ({"sta": -2}, 404, QrPollOutcome.NO_ANSWER),
    ],
)
def test_poll_answers(qr_upstream, payload, status, outcome):
    qr_upstream.login_answers[:] = [answer(payload, status)]
    result = client_for(qr_upstream.url).qr_login_poll("c1")
    assert result.outcome == outcome, result
    assert TOKEN not in result.message
    assert (result.identity is not None) == (outcome == QrPollOutcome.LOGGED_IN)


def test_logged_in_identity_is_cleaned(qr_upstream):
    data = {
        "access_token": f"  {TOKEN.upper()} ",
        "uname": "名\x00字" + "x" * 300,
        "pic": "javascript:alert(1)",
        "unionid": "has space",
    }
    qr_upstream.login_answers[:] = [answer({"sta": 0, "msg": "ok", "data": data})]
    identity = client_for(qr_upstream.url).qr_login_poll("c1").identity
    assert identity.access_token == TOKEN
    assert identity.uname.startswith("名字") and len(identity.uname) == 100
    assert identity.pic == "" and identity.unionid is None


def test_network_error_is_no_answer():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again at once: nobody listens there
    client = client_for(f"http://127.0.0.1:{port}")
    result = client.qr_login_poll("secret-code")
    assert result.outcome == QrPollOutcome.NO_ANSWER
    assert result.message == "connection refused"
    with pytest.raises(QrCodeError) as caught:
        client.qr_code()
    assert not caught.value.refused and caught.value.message == "connection refused"


def test_timeout_is_no_answer():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # accepts the connection, never answers
        client = BaomingClient(base_url=f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.3)
        result = client.qr_login_poll("secret-code")
    assert (result.outcome, result.message) == (QrPollOutcome.NO_ANSWER, "timeout")


@pytest.mark.parametrize(
    ("payload", "status", "refused", "reason"),
    [
        ({"sta": -5, "msg": "服务维护中"}, 200, True, "sta=-5"),
        ({"sta": 0, "msg": "ok", "data": {"qrcode": "https://q/x"}}, 200, False, "data.code"),
        ({"sta": 0, "msg": "ok", "data": {"qrcode": "", "code": "c"}}, 200, False, "data.qrcode"),
        ({"sta": 0, "msg": "ok", "data": {"qrcode": "data:text/html,<script>", "code": "c"}}, 200, False, "qrcode"),
        ({"sta": 0, "msg": "ok", "data": {"qrcode": "https://q/x", "code": "a b"}}, 200, False, "data.code"),
        ({"sta": 0, "msg": "ok", "data": "nope"}, 200, False, "no data"),
        ("not json", 200, False, "not a JSON object"),
        ({"sta": 0}, 503, False, "HTTP 503"),
    ],
)
def test_qr_code_failures(qr_upstream, payload, status, refused, reason):
    qr_upstream.code_answers[:] = [answer(payload, status)]
    with pytest.raises(QrCodeError) as caught:
        client_for(qr_upstream.url).qr_code()
    assert caught.value.refused is refused
    assert reason in caught.value.message


def test_qr_code_bare_base64_picture_becomes_a_data_image(qr_upstream):
    png = segno.make("hello").png_data_uri().split(",", 1)[1]
    qr_upstream.code_answers[:] = [answer({"sta": 0, "msg": "ok", "data": {"qrcode": png, "code": 12345}})]
    qr = client_for(qr_upstream.url).qr_code()
    assert qr.qrcode == f"data:image/png;base64,{png}"
    assert qr.code == "12345"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://p.example/x?a=1", "https://p.example/x?a=1"),
        ("data:image/jpg;base64,/9j/4AAQ", "data:image/jpeg;base64,/9j/4AAQ"),
        ("data:image/png;base64,@@@", None),
        ("data:image/svg+xml;base64,PHN2Zz4=", None),
        ("x" * 2001, None),
        ("line\nbreak", None),
        (None, None),
    ],
)
def test_normalize_qrcode(value, expected):
    assert normalize_qrcode(value) == expected


def test_classification_never_echoes_a_token_in_a_refusal():
    result = classify_qr_login_answer(200, f'{{"sta": -3, "msg": "bad {TOKEN}"}}'.encode())
    assert result.outcome == QrPollOutcome.REFUSED
    assert TOKEN not in result.message


def test_the_fake_plays_the_same_person_scanning_again(fake_baoming):
    client = client_for(fake_baoming.url)
    seen = []
    for _ in range(2):
        qr = client.qr_code()
        fake_qr_scan(base_url=fake_baoming.url, code="latest", details={"unionid": "o-again"})
        seen.append(client.qr_login_poll(qr.code).identity)
    assert seen[0].uname == seen[1].uname and seen[0].unionid == seen[1].unionid == "o-again"
    assert seen[0].access_token != seen[1].access_token
