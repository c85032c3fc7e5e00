"""A real HTTP server that plays the 报名工具 API, for the demo and the benchmarks.

Answers the keep-alive call ``GET /xcx/enroll/v3/detail?eid=...&access_token=...&referer=&spider=h5``
like the upstream does for the old tool's event: ``{"sta": 0, "msg": "未找到已有报名记录", "data": null}``
for a known token (valid, not enrolled), ``{"sta": -1, "msg": "invalid access_token"}`` for a token
listed as invalid, and a business error when ``eid`` or ``spider=h5`` is missing. It can
add latency, enforce a rate limit (answering the upstream's throttle message) and records when each
request arrived, so a benchmark can prove the shared limit was never exceeded.

Run alone: ``python -m leasesite.fakes.baoming_server --port 8765 --invalid-prefix 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from leasesite.fakes.background import BackgroundServer


class FakeBaomingState:
    def __init__(self, *, latency: float = 0.0, invalid_prefix: str = "", limit_per_second: float = 0.0) -> None:
        self.latency = latency
        self.invalid_prefix = invalid_prefix
        self.invalid_tokens: set[str] = set()
        self.limit_per_second = limit_per_second
        self.arrivals: list[float] = []
        self._window: deque[float] = deque()
        self._lock = threading.Lock()

    def record(self) -> bool:
        """Record an arrival; False if it exceeds the configured per-second limit."""
        now = time.monotonic()
        with self._lock:
            self.arrivals.append(now)
            if not self.limit_per_second:
                return True
            while self._window and now - self._window[0] >= 1.0:
                self._window.popleft()
            if len(self._window) >= self.limit_per_second:
                return False
            self._window.append(now)
            return True

    def is_invalid(self, token: str) -> bool:
        return token in self.invalid_tokens or bool(self.invalid_prefix and token.startswith(self.invalid_prefix))

    def max_in_any_second(self) -> int:
        """The most requests that arrived within any 1-second window."""
        times = sorted(self.arrivals)
        best = start = 0
        for end, t in enumerate(times):
            while t - times[start] >= 1.0:
                start += 1
            best = max(best, end - start + 1)
        return best


def make_handler(state: FakeBaomingState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real upstream
        # Headers and body go out in two writes; with Nagle's algorithm the body would wait for the
        # client's delayed ACK (~40 ms per answer), an artefact no real server has.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            allowed = state.record()
            if state.latency:
                time.sleep(state.latency)
            url = urlsplit(self.path)
            if url.path != "/xcx/enroll/v3/detail":
                self._send(404, {"sta": -1, "msg": "not found", "data": None})
                return
            if not allowed:
                self._send(200, {"sta": -1, "msg": "请求过于频繁，请稍后重试", "data": None})
                return
            query = parse_qs(url.query, keep_blank_values=True)
            token = query.get("access_token", [""])[0]
            if not token or state.is_invalid(token):
                self._send(200, {"sta": -1, "msg": "invalid access_token", "data": None})
                return
            if not query.get("eid", [""])[0] or query.get("spider", [""])[0] != "h5":
                self._send(200, {"sta": -1, "msg": "参数错误", "data": None})
                return
            self._send(200, {"sta": 0, "msg": "未找到已有报名记录", "data": None})

    return Handler


class FakeBaomingServer(BackgroundServer):
    """Start in a background thread: ``with FakeBaomingServer() as server: server.url``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **state_options: object) -> None:
        self.state = FakeBaomingState(**state_options)
        super().__init__(make_handler(self.state), host=host, port=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every answer")
    parser.add_argument("--invalid-prefix", default="0", help="tokens starting with this answer invalid")
    parser.add_argument("--limit", type=float, default=0.0, help="answer 'too frequent' above this many req/s")
    args = parser.parse_args()
    server = FakeBaomingServer(
        host=args.host,
        port=args.port,
        latency=args.latency,
        invalid_prefix=args.invalid_prefix,
        limit_per_second=args.limit,
    )
    print(f"fake 报名工具 API on {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()


if __name__ == "__main__":
    main()
