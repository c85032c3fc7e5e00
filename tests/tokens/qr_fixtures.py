"""Fixtures of the QR-login tests: the bundled fake 报名工具 server (real HTTP, with its QR
endpoints and control endpoint), a scriptable local server for answers the fake never gives, and
the environment of a subprocess that shares the test database."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response

from leasesite.fakes.baoming_server import QR_CODE_PATH, QR_LOGIN_PATH, FakeBaomingServer
from tokens.models import QrLogin


def _clear_client_cache() -> None:
    from tokens.clients import _cached_client

    _cached_client.cache_clear()


@pytest.fixture
def fake_baoming(settings) -> Iterator[FakeBaomingServer]:
    """The fake 报名工具 API in a background thread; the app is pointed at it."""
    with FakeBaomingServer(invalid_prefix="0") as server:
        settings.BAOMING_API_BASE = server.url
        _clear_client_cache()
        yield server
    _clear_client_cache()


def answer(payload: object, status: int = 200) -> Callable[[], Response]:
    body = payload if isinstance(payload, str | bytes) else json.dumps(payload, ensure_ascii=False)
    return lambda: Response(body, status=status, content_type="application/json")


@dataclass
class ScriptedQrUpstream:
    """A real local HTTP server whose ``pc_code`` / ``pc_login`` answers a test scripts: lists of
    answers, consumed one per request, the last one repeating."""

    server: HTTPServer
    code_answers: list[Callable[[], Response]] = field(default_factory=list)
    login_answers: list[Callable[[], Response]] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def _next(self, answers: list[Callable[[], Response]]) -> Callable[[], Response]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append({"path": request.path, "args": dict(request.args), "at": time.monotonic()})
            scripted = self._next(self.code_answers if request.path == QR_CODE_PATH else self.login_answers)
        return scripted()


@pytest.fixture
def qr_upstream(settings) -> Iterator[ScriptedQrUpstream]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    scripted = ScriptedQrUpstream(server)
    scripted.code_answers.append(
        answer({"sta": 0, "msg": "ok", "data": {"qrcode": "https://qr.example/x", "code": "c1"}})
    )
    scripted.login_answers.append(answer({"sta": -1, "msg": "please wait", "data": None}))
    server.expect_request(QR_CODE_PATH).respond_with_handler(scripted.handle)
    server.expect_request(QR_LOGIN_PATH).respond_with_handler(scripted.handle)
    settings.BAOMING_API_BASE = scripted.url
    _clear_client_cache()
    yield scripted
    server.clear()
    if server.is_running():
        server.stop()
    _clear_client_cache()


def subprocess_env(*, base_url: str, **extra: str) -> dict[str, str]:
    """Environment for a ``manage.py`` subprocess on this test's (committed) database."""
    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "leasesite.settings"
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
        env["DATABASE_URL"] = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env["BAOMING_API_BASE"] = base_url
    env.update(extra)
    return env


def wait_for_login(predicate: Callable[[QrLogin], bool], *, timeout: float = 30.0) -> QrLogin:
    """The newest QR login, once ``predicate`` holds for it (polling the database)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        login = QrLogin.objects.order_by("-created_at").first()
        if login is not None and predicate(login):
            return login
        time.sleep(0.05)
    raise AssertionError(f"no QR login matched within {timeout}s (last: {login and login.status})")
