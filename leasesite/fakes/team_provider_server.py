"""A real HTTP server that plays team providers (DESIGN §4), for tests, the demo and benchmarks.

Every team lives under its own prefix: a ``Team`` with ``api_base = {url}/teams/alpha/`` talks to
the fake team ``alpha``. The answers follow the contract: paged ``members`` and ``invites``,
``POST invites`` (201, or 409 when already invited or a member), ``DELETE members/{id}`` and
``DELETE invites/{email}`` (204, or 404). Latency can be added to every answer. A team can be
made to fail its next calls with any status (``fail_next``; a 429 carries ``Retry-After`` when
the error has ``retry_after``, or verbatim its ``retry_after_header``, e.g. an HTTP-date).

Control endpoints for people and scripts (not part of the contract):
``POST /_control/teams/{name}/accept`` with ``{"email": ...}`` accepts an invite (the member
"joins"); ``GET /_control/teams/{name}`` shows the team.

Run alone: ``python -m leasesite.fakes.team_provider_server --port 8766 --auto-join-after 30``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from leases.providers.base import ProviderError
from leases.providers.memory import FakeTeam
from leasesite.fakes.background import BackgroundServer


class FakeProviderState:
    def __init__(self, *, latency: float = 0.0, auto_join_after: float | None = None, token: str = "") -> None:
        self.latency = latency
        self.auto_join_after = auto_join_after
        self.token = token  # when set, requests must carry "Authorization: Bearer {token}"
        self.teams: dict[str, FakeTeam] = {}
        self.requests: list[tuple[str, str, str]] = []  # (team, method, path)
        self.request_times: list[float] = []  # time.monotonic() of each contract request
        # While set, DELETE requests wait for it to clear (tests stop a transfer mid-way).
        self.hold_deletes = threading.Event()
        self.delete_arrived = threading.Event()
        # Held DELETEs then fail with 503 instead of acting (the caller died mid-request).
        self.discard_held_deletes = False
        # While set, POST invites wait for it to clear, then act (a slow invite mid-transfer).
        self.hold_invites = threading.Event()
        self.invite_arrived = threading.Event()
        self._lock = threading.Lock()

    def team(self, name: str) -> FakeTeam:
        with self._lock:
            if name not in self.teams:
                self.teams[name] = FakeTeam(name, auto_join_after=self.auto_join_after)
            return self.teams[name]

    def calls(self, team: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for t, m, _ in self.requests
                if (team is None or t == team) and (method is None or m == method) and t != "_control"
            )


def _page(items: list[dict], query: dict[str, list[str]]) -> dict:
    try:
        offset = max(0, int(query.get("offset", ["0"])[0]))
        limit = max(1, min(500, int(query.get("limit", ["100"])[0])))
    except ValueError:
        offset, limit = 0, 100
    return {"items": items[offset : offset + limit], "total": len(items)}


def make_handler(state: FakeProviderState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, payload: object | None = None, headers: dict[str, str] | None = None) -> None:
            body = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if payload is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if len(parts) >= 3 and parts[0] == "_control" and parts[1] == "teams":
                self._control(method, parts[2], parts[3:])
                return
            if len(parts) < 3 or parts[0] != "teams":
                self._send(404, {"error": "not found"})
                return
            name, rest = parts[1], parts[2:]
            with state._lock:
                state.requests.append((name, method, "/".join(rest)))
                state.request_times.append(time.monotonic())
            body = self._body() if method == "POST" else {}
            if state.latency:
                time.sleep(state.latency)
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
                self._send(401, {"error": "bad token"})
                return
            team = state.team(name)
            try:
                team.count(f"{method} {rest[0]}")
            except ProviderError as exc:
                # ``retry_after_header`` on the error, when set, is sent verbatim (an HTTP-date, say).
                header = getattr(exc, "retry_after_header", None)
                if header is None and exc.retry_after is not None:
                    header = f"{exc.retry_after:g}"
                headers = {"Retry-After": header} if header is not None else None
                self._send(exc.status or 500, {"error": str(exc)}, headers)
                return
            query = parse_qs(url.query)
            if method == "GET" and rest == ["members"]:
                members = sorted(team.list_members(), key=lambda m: m.id)
                items = [
                    {"id": m.id, "email": m.email, "joined_at": m.joined_at.isoformat() if m.joined_at else None}
                    for m in members
                ]
                self._send(200, _page(items, query))
            elif method == "GET" and rest == ["invites"]:
                invites = sorted(team.list_invites(), key=lambda i: i.email)
                items = [
                    {"email": i.email, "invited_at": i.invited_at.isoformat() if i.invited_at else None}
                    for i in invites
                ]
                self._send(200, _page(items, query))
            elif method == "POST" and rest == ["invites"]:
                email = body.get("email")
                if not isinstance(email, str) or "@" not in email:
                    self._send(400, {"error": "email required"})
                    return
                if state.hold_invites.is_set():
                    state.invite_arrived.set()
                    while state.hold_invites.is_set():
                        time.sleep(0.02)
                self._send(201 if team.invite(email) else 409, {"email": email.lower()})
            elif method == "DELETE" and len(rest) == 2 and rest[0] in ("members", "invites"):
                if state.hold_deletes.is_set():
                    state.delete_arrived.set()
                    while state.hold_deletes.is_set():
                        time.sleep(0.02)
                    if state.discard_held_deletes:
                        self._send(503, {"error": "discarded"})
                        return
                removed = team.remove_member(rest[1]) if rest[0] == "members" else team.cancel_invite(rest[1])
                self._send(204 if removed else 404)
            else:
                self._send(404, {"error": "not found"})

        def _control(self, method: str, name: str, rest: list[str]) -> None:
            team = state.team(name)
            if method == "POST" and rest == ["accept"]:
                email = self._body().get("email")
                if not isinstance(email, str) or email.lower() not in team.invited_emails():
                    self._send(404, {"error": "no such invite"})
                    return
                self._send(200, {"id": team.accept(email), "email": email.lower()})
            elif method == "GET" and not rest:
                self._send(
                    200,
                    {
                        "members": sorted(team.member_emails()),
                        "invites": sorted(team.invited_emails()),
                        "calls": team.calls,
                    },
                )
            else:
                self._send(404, {"error": "not found"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


class FakeProviderServer(BackgroundServer):
    """Start in a background thread: ``with FakeProviderServer() as server: server.team_url("a")``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **state_options: object) -> None:
        self.state = FakeProviderState(**state_options)
        super().__init__(make_handler(self.state), host=host, port=port)

    def team_url(self, name: str) -> str:
        return f"{self.url}/teams/{name}/"

    def stop(self) -> None:
        self.state.hold_deletes.clear()  # a held request must not keep shutdown waiting
        self.state.hold_invites.clear()
        super().stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument(
        "--auto-join-after", type=float, default=None, help="invites are accepted after this many seconds"
    )
    args = parser.parse_args()
    server = FakeProviderServer(
        host=args.host, port=args.port, latency=args.latency, auto_join_after=args.auto_join_after
    )
    print(f"fake team provider on {server.url} (teams under {server.url}/teams/NAME/)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()


if __name__ == "__main__":
    main()
