"""A real HTTP server that plays the 报名工具 API, for the demo and the benchmarks.

Answers the keep-alive call ``GET /xcx/enroll/v3/detail?eid=...&access_token=...&referer=&spider=h5``
like the upstream does for the old tool's event: ``{"sta": 0, "msg": "未找到已有报名记录", "data": null}``
for a known token (valid, not enrolled), ``{"sta": -1, "msg": "invalid access_token"}`` for a token
listed as invalid, and a business error when ``eid`` or ``spider=h5`` is missing. It can
add latency, enforce a rate limit (answering the upstream's throttle message) and records when each
request arrived, so a benchmark can prove the shared limit was never exceeded.

It also plays the QR-code login (``pc_code`` / ``pc_login``, see ``FakeQrLogins``): nobody can
scan its codes with WeChat, so ``POST /_control/qr/{code}/scan`` (or ``/_control/qr/latest/scan``,
the newest code waiting) "scans" one, and the next ``pc_login`` returns a new token.

Run alone: ``python -m leasesite.fakes.baoming_server --port 8765 --invalid-prefix 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, urlsplit

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

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        qr_lifetime: float = 180.0,
        qr_picture: bool = False,
        **state_options: object,
    ) -> None:
        self.state = FakeBaomingState(**state_options)
        self.qr = FakeQrLogins(lifetime=qr_lifetime, picture=qr_picture, avoid_prefix=self.state.invalid_prefix)
        super().__init__(make_qr_handler(make_handler(self.state), self.state, self.qr), host=host, port=port)


# --- QR-code login ------------------------------------------------------------------------------

QR_CODE_PATH = "/xcx/enroll_web/v1/pc_code"
QR_LOGIN_PATH = "/xcx/enroll_web/v1/pc_login"
_SCAN_PATH = re.compile(r"^/_control/qr/([^/]+)/scan$")


@dataclass
class FakeQrCode:
    issued_at: float
    scene: str
    identity: dict | None = None  # set when "scanned"; pc_login then hands it out once
    collected: bool = False


@dataclass
class FakeQrLogins:
    """The fake's QR logins: codes issued, which of them were "scanned", and when they expire.

    A scan without details logs in a new person each time (``扫码用户N``); pass ``unionid`` (and
    ``uname``, ``pic``, ``access_token``) to play the same person scanning again (a new token,
    the name and avatar they had)."""

    lifetime: float = 180.0
    picture: bool = False
    avoid_prefix: str = ""  # new tokens never start with the prefix the fake answers invalid for
    codes: dict[str, FakeQrCode] = field(default_factory=dict)
    requests: list[tuple[str, float]] = field(default_factory=list)  # (path, monotonic time) of each call
    _people: itertools.count = field(default_factory=lambda: itertools.count(1))
    _people_by_unionid: dict[str, dict] = field(default_factory=dict)  # a person scanning again keeps their name
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _new_token(self) -> str:
        while True:
            token = secrets.token_hex(16)
            if not (self.avoid_prefix and token.startswith(self.avoid_prefix)):
                return token

    def _expired(self, entry: FakeQrCode) -> bool:
        return time.monotonic() - entry.issued_at > self.lifetime

    def issue(self) -> dict:
        """The ``data`` of a ``pc_code`` answer."""
        code, scene = secrets.token_urlsafe(18), secrets.token_hex(8)
        with self._lock:
            self.codes[code] = FakeQrCode(issued_at=time.monotonic(), scene=scene)
        content = f"https://p.baominggongju.com/fake-login?scene={scene}"
        if self.picture:
            import segno

            content = segno.make(content, error="m").png_data_uri(scale=4)
        return {"qrcode": content, "code": code}

    def poll(self, code: str) -> dict:
        """A whole ``pc_login`` answer."""
        with self._lock:
            entry = self.codes.get(code)
            if entry is None or entry.collected or self._expired(entry):
                return {"sta": -2, "msg": "二维码已失效，请刷新", "data": None}
            if entry.identity is None:
                return {"sta": -1, "msg": "please wait", "data": None}
            entry.collected = True
            return {"sta": 0, "msg": "ok", "data": dict(entry.identity)}

    def scan(self, code: str, details: dict | None = None) -> dict | None:
        """Mark a code scanned ("latest": the newest one waiting); the identity handed out, or
        None when there is no such code waiting."""
        details = details or {}
        with self._lock:
            if code == "latest":
                waiting = [
                    (entry.issued_at, key)
                    for key, entry in self.codes.items()
                    if entry.identity is None and not entry.collected and not self._expired(entry)
                ]
                code = max(waiting)[1] if waiting else ""
            entry = self.codes.get(code)
            if entry is None or entry.identity is not None or entry.collected or self._expired(entry):
                return None
            known = self._people_by_unionid.get(str(details.get("unionid") or ""), {})
            person = next(self._people)
            entry.identity = {
                "access_token": str(details.get("access_token") or self._new_token()),
                "uname": str(details.get("uname") or known.get("uname") or f"扫码用户{person}"),
                "pic": str(details.get("pic") or known.get("pic") or f"https://example.com/avatars/{person}.png"),
                "unionid": str(details.get("unionid") or f"o-fake-{secrets.token_hex(6)}"),
            }
            self._people_by_unionid[entry.identity["unionid"]] = entry.identity
            return {key: value for key, value in entry.identity.items() if key != "access_token"}


def make_qr_handler(
    base: type[BaseHTTPRequestHandler], state: FakeBaomingState, qr: FakeQrLogins
) -> type[BaseHTTPRequestHandler]:
    """The API handler plus the QR login endpoints and their control endpoint."""

    class QrHandler(base):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            if url.path not in (QR_CODE_PATH, QR_LOGIN_PATH):
                super().do_GET()
                return
            allowed = state.record()
            qr.requests.append((url.path, time.monotonic()))
            if state.latency:
                time.sleep(state.latency)
            if not allowed:
                self._send(200, {"sta": -1, "msg": "请求过于频繁，请稍后重试", "data": None})
            elif url.path == QR_CODE_PATH:
                self._send(200, {"sta": 0, "msg": "ok", "data": qr.issue()})
            else:
                self._send(200, qr.poll(parse_qs(url.query).get("code", [""])[0]))

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            match = _SCAN_PATH.fullmatch(urlsplit(self.path).path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if match is None:
                self._send(404, {"error": "not found"})
                return
            try:
                details = json.loads(raw) if raw.strip() else {}
            except ValueError:
                details = None
            if not isinstance(details, dict):
                self._send(400, {"error": "the body must be a JSON object"})
                return
            identity = qr.scan(match.group(1), details)
            if identity is None:
                self._send(404, {"error": "no such QR code waiting (unknown, expired, or scanned already)"})
                return
            self._send(200, {"scanned": True, **identity})

    return QrHandler


class FakeScanError(Exception):
    """The fake did not scan the code (no such code waiting, or it could not be reached)."""


def fake_qr_scan(*, base_url: str, code: str, details: dict | None = None, timeout: float = 5.0) -> dict:
    """Ask the fake at ``base_url`` to "scan" ``code``: the demo's button and the tests use this.
    Returns the identity the next ``pc_login`` hands out (without its token)."""
    request = urllib.request.Request(  # noqa: S310 - an http(s) URL of our own fake
        f"{base_url.rstrip('/')}/_control/qr/{quote(code, safe='')}/scan",
        data=json.dumps(details or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - our own fake
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise FakeScanError(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FakeScanError(type(exc).__name__) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every answer")
    parser.add_argument("--invalid-prefix", default="0", help="tokens starting with this answer invalid")
    parser.add_argument("--limit", type=float, default=0.0, help="answer 'too frequent' above this many req/s")
    parser.add_argument("--qr-lifetime", type=float, default=180.0, help="seconds a QR login code stays valid")
    parser.add_argument(
        "--qr-picture", action="store_true", help="answer pc_code with a data:image picture instead of a URL"
    )
    args = parser.parse_args()
    server = FakeBaomingServer(
        host=args.host,
        port=args.port,
        latency=args.latency,
        invalid_prefix=args.invalid_prefix,
        limit_per_second=args.limit,
        qr_lifetime=args.qr_lifetime,
        qr_picture=args.qr_picture,
    )
    print(f"fake 报名工具 API on {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()


if __name__ == "__main__":
    main()
