from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response

from tokens.models import BaomingToken


def new_token_value() -> str:
    return secrets.token_hex(16)


@dataclass
class Upstream:
    """A real local HTTP server playing the 报名工具 API.

    ``answers`` maps a token to a callable returning a werkzeug Response, or to a list of them
    (consumed one per request, the last one repeating). Unknown tokens answer ok.
    """

    server: HTTPServer
    answers: dict[str, object] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def handle(self, request: Request) -> Response:
        token = request.args.get("access_token", "")
        with self._lock:
            self.requests.append(
                {
                    "token": token,
                    "args": dict(request.args),
                    "query": request.query_string.decode(),
                    "at": time.monotonic(),
                    "path": request.path,
                }
            )
            answer = self.answers.get(token, ok)
            if isinstance(answer, list):
                answer = answer.pop(0) if len(answer) > 1 else answer[0]
        return answer()  # type: ignore[operator]

    def calls_for(self, token: str) -> int:
        return sum(1 for r in self.requests if r["token"] == token)


def json_answer(payload: object, status: int = 200, headers: dict | None = None) -> Callable[[], Response]:
    return lambda: Response(
        json.dumps(payload, ensure_ascii=False), status=status, headers=headers, content_type="application/json"
    )


ok = json_answer({"sta": 0, "msg": "ok", "data": {"title": "t", "start_time": 1700000000}})
invalid = json_answer({"sta": -1, "msg": "invalid access_token", "data": None})
throttled = json_answer({"sta": -1, "msg": "请求过于频繁，请稍后重试", "data": None})
server_error = json_answer({"sta": -1, "msg": "internal"}, status=500)


@pytest.fixture
def upstream(settings) -> Iterator[Upstream]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    fake = Upstream(server)
    server.expect_request("/xcx/enroll/v3/detail").respond_with_handler(fake.handle)
    settings.BAOMING_API_BASE = fake.url
    from tokens.clients import _cached_client

    _cached_client.cache_clear()
    yield fake
    server.clear()
    if server.is_running():
        server.stop()
    _cached_client.cache_clear()


@pytest.fixture
def eager_tasks(monkeypatch) -> None:
    """Tasks sent by the code under test run at once, in this process (``.delay`` → ``.apply``)."""
    from leasesite.celery import app

    monkeypatch.setattr(app.conf, "task_always_eager", True)
    monkeypatch.setattr(app.conf, "task_eager_propagates", True)


@pytest.fixture
def make_token() -> Callable[..., BaomingToken]:
    counter = iter(range(1, 1_000_000))

    def factory(**kwargs: object) -> BaomingToken:
        n = next(counter)
        kwargs.setdefault("card_name", f"名片{n}")
        kwargs.setdefault("user_name", f"user{n}")
        kwargs.setdefault("token", new_token_value())
        return BaomingToken.objects.create(**kwargs)

    return factory


@pytest.fixture(autouse=True)
def _reset_rate_limiter() -> Iterator[None]:
    """Each test starts with an empty shared rate-limit bucket."""
    from leasesite.ratelimit import EPOCH_KEY
    from leasesite.redis_client import get_redis

    get_redis().delete("leasesite:ratelimit:baoming")
    # This Redis has not lost anything: no test but the restart's pays the post-restart wait.
    get_redis().set(EPOCH_KEY, "1", px=86_400_000)
    yield


@pytest.fixture
def live_server_env(settings, upstream) -> dict[str, str]:
    """Environment for a subprocess that must see this test's committed data and upstream."""
    import os

    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "leasesite.settings"
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
        env["DATABASE_URL"] = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env["BAOMING_API_BASE"] = upstream.url
    return env


# The lease engine's fixtures (fake team provider server, teams, leases, codes).
from tests.lease_fixtures import (  # noqa: E402
    _fresh_memory_teams,  # noqa: F401
    make_code,  # noqa: F401
    make_lease,  # noqa: F401
    make_team,  # noqa: F401
    provider,  # noqa: F401
)
