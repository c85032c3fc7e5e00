"""Fault family 4: the 报名工具 API answers garbage — HTTP 500, timeouts, HTML, truncated JSON, wrong
shapes (a list, no ``sta``, ``sta`` as a string, a huge ``data``) — or "invalid access_token" for
every token, at runs of 5, 50 and 500 tokens, through two real workers.

For each fault, three runs in a row (the outage lasts): no token is deleted (an all-invalid
upstream trips the circuit breaker, so nothing is), every check is counted as a failure (or as
invalid) in the run's figures and on the token, each token is asked exactly once per run, and the
problem alerts exactly **once** (Apprise ``json://`` to a local receiver), however many runs it
lasts; the first good run after it sends one "resolved".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from django.db.models import Sum
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Request, Response

from tests.faults import processes
from tests.faults._h4_support import AlertSink, Workers, make_tokens, wait_run_final, worker_env
from tokens.models import BaomingToken, RunStatus, TokenDeletion
from tokens.tasks import refresh_tokens

pytestmark = pytest.mark.django_db(transaction=True)

# Run sizes: 5 (one batch), 50 (one full batch) and 500 (ten batches over two workers). The
# big size runs for the two faults that hit every token the same way in production (an outage, an
# "invalid" for everything); the other shapes are per-answer parsing, covered at 5 and 50.
SIZES = (5, 50)
BIG_SIZES = (5, 50, 500)
BIG_FAULTS = ("http-500", "invalid-for-every-token")
BATCH_SIZE = 50
TIMEOUT = 1.0  # long enough for a local answer on a loaded 2-core host


def _json(payload: object, status: int = 200) -> Callable[[], Response]:
    body = json.dumps(payload, ensure_ascii=False)
    return lambda: Response(body, status=status, content_type="application/json")


def _raw(body: str, status: int = 200, content_type: str = "text/html") -> Callable[[], Response]:
    return lambda: Response(body, status=status, content_type=content_type)


def _slow() -> Response:
    time.sleep(TIMEOUT + 0.5)
    return Response('{"sta": 0, "msg": "ok"}', content_type="application/json")


FAULTS: dict[str, Callable[[], Response]] = {
    "http-500": _json({"sta": -1, "msg": "internal"}, status=500),
    "timeout": _slow,
    "html": _raw("<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "truncated-json": _raw('{"sta": 0, "msg": "o', content_type="application/json"),
    "a-list": _json([{"sta": 0, "msg": "ok"}]),
    "no-sta": _json({"msg": "系统繁忙", "data": None}),
    "sta-as-string": _json({"sta": "0", "msg": "ok", "data": None}),
    "huge-data": _json({"sta": 1, "msg": "系统繁忙", "data": "x" * 512 * 1024}),
}
ALL_INVALID = "invalid-for-every-token"


class SwitchableUpstream:
    """The 报名工具 API for a whole module: every token gets the answer of the current ``mode``."""

    def __init__(self) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        self.mode: Callable[[], Response] = _json({"sta": 0, "msg": "ok"})
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server.expect_request("/xcx/enroll/v3/detail").respond_with_handler(self._handle)
        self.server.start()

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def _handle(self, request: Request) -> Response:
        token = request.args.get("access_token", "")
        with self._lock:
            self.calls[token] = self.calls.get(token, 0) + 1
            answer = self.mode
        return answer()

    def reset(self, mode: Callable[[], Response]) -> None:
        with self._lock:
            self.mode, self.calls = mode, {}


@pytest.fixture(scope="module")
def rig(
    django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[tuple[SwitchableUpstream, AlertSink, Workers]]:
    """One upstream, one alert receiver and two workers for the module (starting workers per test
    would cost most of the module's time)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the fault suite runs on PostgreSQL (DATABASE_URL=postgres://...)")
    upstream, sink = SwitchableUpstream(), AlertSink()
    pool = Workers(tmp_path_factory.mktemp("garbage"))
    env = worker_env(
        upstream.url,
        NOTIFY_URLS=sink.url,
        BAOMING_BATCH_SIZE=str(BATCH_SIZE),
        BAOMING_TIMEOUT=str(TIMEOUT),
        BAOMING_CONCURRENCY="32",
        BAOMING_RATE_LIMIT="5000",
    )
    pool.start(2, env)
    yield upstream, sink, pool
    pool.stop_all()
    sink.stop()
    upstream.server.stop()
    assert "Traceback" not in pool.log_text(), pool.log_text()[-5000:]


def _run(pool: Workers, token_ids: list[int], *, after_id: int, tasks_before: int) -> tuple:
    refresh_tokens.delay(token_ids=token_ids)
    run = wait_run_final(after_id=after_id, timeout=60)
    batches = -(-len(token_ids) // BATCH_SIZE)
    # The run is final once its last batch closed it; wait until that task returned too, so every
    # alert it sends has been delivered before counting them.
    expected = tasks_before + 1 + batches
    processes.wait_for(
        lambda: pool.succeeded("tokens.refresh_batch") + pool.succeeded("tokens.refresh_tokens") >= expected,
        timeout=30,
        what="the run's tasks to return",
    )
    return run, expected


@pytest.mark.parametrize("fault", [*FAULTS, ALL_INVALID])
def test_garbage_from_the_upstream_deletes_nothing_counts_failures_and_alerts_once(rig, fault):
    upstream, sink, pool = rig
    sink.clear()
    from tests.conftest import invalid

    upstream.reset(invalid if fault == ALL_INVALID else FAULTS[fault])
    sizes = BIG_SIZES if fault in BIG_FAULTS else SIZES
    tokens = make_tokens(sum(sizes))
    stored = {t.fingerprint for t in tokens}
    tasks = pool.succeeded("tokens.refresh_batch") + pool.succeeded("tokens.refresh_tokens")
    last_id, offset = 0, 0
    for size in sizes:
        subset = tokens[offset : offset + size]
        offset += size
        run, tasks = _run(pool, [t.pk for t in subset], after_id=last_id, tasks_before=tasks)
        last_id = run.pk
        if fault == ALL_INVALID:
            # The breaker trips: the answers are counted invalid, and no token is deleted.
            assert (run.status, run.total, run.invalid, run.ok, run.deleted) == (
                RunStatus.TRIPPED, size, size, 0, 0,
            ), f"{run.failed} failed"  # fmt: skip
            assert run.breaker_tripped
        else:
            assert (run.status, run.total, run.failed, run.ok, run.invalid, run.deleted) == (
                RunStatus.FAILED, size, size, 0, 0, 0,
            )  # fmt: skip
        assert sorted(upstream.calls.get(t.token, 0) for t in subset) == [1] * size, "each token asked once per run"
        checked = BaomingToken.objects.filter(pk__in=[t.pk for t in subset])
        assert checked.aggregate(n=Sum("consecutive_failures"))["n"] == size
        assert not checked.filter(last_error="").exists()
        assert not checked.filter(last_used__isnull=False).exists()
    assert set(BaomingToken.objects.values_list("fingerprint", flat=True)) == stored
    assert not TokenDeletion.objects.exists()
    titles = sink.titles()
    assert len(titles) == 1, f"one alert for one problem lasting {len(sizes)} runs, got {titles}"

    # The upstream recovers: the next run succeeds and says so, once.
    upstream.reset(_json({"sta": 0, "msg": "ok"}))
    run, tasks = _run(pool, [t.pk for t in tokens[:5]], after_id=last_id, tasks_before=tasks)
    assert (run.status, run.ok) == (RunStatus.SUCCEEDED, 5)
    titles = sink.titles()
    assert len(titles) == 2 and titles[1].startswith(("Resolved", "已恢复")), titles
