"""The built-in ``http`` team provider: the JSON contract of DESIGN §4.

One ``requests.Session`` per process (connection reuse), explicit timeouts, typed errors:
HTTP 429, 5xx, timeouts, connection errors and malformed answers are ``TransientProviderError``;
other 4xx are ``PermanentProviderError``; 409 on invite and 404 on removal mean "already done".
Listings are paged with ``offset``/``limit`` until ``total`` items were read.

401/403 (credentials refused) and 402 (workspace deactivated) raise ``TeamDeadError``: the team
is dead, not the lease. Every request to one provider host first takes a slot of one shared rate
limit (``LEASE_PROVIDER_RATE_LIMIT`` per second, all workers together, through Redis); a 429
with ``Retry-After`` pauses that host's limiter for every worker and the request is tried again
(at most ``RETRY_AFTER_ATTEMPTS`` times, each wait at most ``MAX_RETRY_AFTER_SECONDS``).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests
import urllib3
from django.conf import settings
from requests import certs
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from leases.providers.base import (
    TEAM_DEAD_STATUSES,
    PermanentProviderError,
    ProviderInvite,
    ProviderMember,
    TeamDeadError,
    TransientProviderError,
)
from leasesite.ratelimit import RateLimiter, get_rate_limiter
from leasesite.upstream_metrics import upstream_call_observe, upstream_host

MAX_PAGES = 10_000  # a provider whose "total" never ends must not loop us forever
RETRY_AFTER_ATTEMPTS = 2  # a 429 is retried this often within one call, then it is transient
MAX_RETRY_AFTER_SECONDS = 30.0  # a longer Retry-After is honoured by the next run, not by sleeping


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds — delta-seconds or an HTTP-date (RFC 9110) — or None."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, (when - datetime.now(UTC)).total_seconds())
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, 24 * 3600.0)


def host_limiter(api_base: str) -> RateLimiter:
    """One shared limiter per provider host (scheme + host + port)."""
    parts = urlsplit(api_base)
    return get_rate_limiter(name=f"provider:{parts.scheme}://{parts.netloc}", rate=settings.LEASE_PROVIDER_RATE_LIMIT)


USER_AGENT = "leasesite/1 (+team-provider)"


@lru_cache(maxsize=1)
def _session() -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=32, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


@lru_cache(maxsize=64)
def _direct_pool(origin: str) -> urllib3.HTTPConnectionPool | None:
    """A urllib3 connection pool for one provider origin — the transport under requests, without
    requests' per-call layers (re-reading the whole environment for proxy settings on every call
    was most of a call's CPU) — or None when the environment names a proxy for it (then the
    calls go through the Session, which applies it)."""
    environment = _session().merge_environment_settings(origin, {}, None, None, None)
    if environment.get("proxies"):
        return None
    options: dict[str, Any] = {}
    if origin.startswith("https://"):
        verify = environment.get("verify")
        options = {"cert_reqs": "CERT_REQUIRED", "ca_certs": verify if isinstance(verify, str) else certs.where()}
    return urllib3.connection_from_url(origin, maxsize=32, block=False, retries=False, **options)


class ProviderAnswer:
    """What a provider answered: the status, the headers (case-insensitive) and the body."""

    __slots__ = ("body", "headers", "status_code")

    def __init__(self, status_code: int, headers: Any, body: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def parse_timestamp(value: Any) -> datetime | None:
    """ISO-8601 (``Z`` or offset; naive means UTC) or epoch seconds; None when absent."""
    if value in (None, ""):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    if not isinstance(value, str):
        raise TransientProviderError(f"malformed answer: timestamp {value!r} is not a string")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise TransientProviderError(f"malformed answer: timestamp {value[:40]!r} is not ISO-8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def provider_outcome(status: int) -> str:
    """A provider answer's outcome label, in the words of DESIGN §4."""
    if status == 429:
        return "rate_limited"
    if status in TEAM_DEAD_STATUSES:
        return "team_dead"
    if status >= 500:
        return "server_error"
    if status in (404, 409):
        return "already_done"  # "not a member" / "already invited": treated as done
    if status >= 400:
        return "client_error"
    return "ok"


class HttpTeamProvider:
    def __init__(self, *, api_base: str, api_token: str, timeout: float | None = None) -> None:
        if not api_base:
            raise PermanentProviderError("the team has no API base URL")
        self.api_base = api_base.rstrip("/") + "/"
        self._headers = {"Authorization": f"Bearer {api_token}", "Accept": "application/json", "User-Agent": USER_AGENT}
        self.timeout = timeout if timeout is not None else settings.LEASE_PROVIDER_TIMEOUT
        self.page_size = settings.LEASE_PROVIDER_PAGE_SIZE
        self.calls = 0
        self.limiter = host_limiter(self.api_base)
        self.host = upstream_host(self.api_base)
        parts = urlsplit(self.api_base)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._timeouts = urllib3.Timeout(connect=self.timeout, read=self.timeout)

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, method: str, path: str, params: dict[str, Any] | None, payload: Any) -> ProviderAnswer:
        """One HTTP exchange; raises ``TimeoutError`` for a timeout and ``ConnectionError`` for
        every other transport failure (refused, reset, broken answer)."""
        url = self.api_base + path + (f"?{urlencode(params)}" if params else "")
        headers = self._headers
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            headers = {**headers, "Content-Type": "application/json"}
        pool = _direct_pool(self.origin)
        if pool is None:
            try:
                response = _session().request(method, url, headers=headers, data=body, timeout=self.timeout)
            except requests.Timeout:
                raise TimeoutError from None
            except requests.RequestException as exc:
                raise ConnectionError(type(exc).__name__) from None
            return ProviderAnswer(response.status_code, response.headers, response.content)
        try:
            response = pool.urlopen(
                method,
                url,
                body=body,
                headers=headers,
                timeout=self._timeouts,
                retries=False,
                redirect=False,
                assert_same_host=False,
            )
        except urllib3.exceptions.TimeoutError as exc:
            # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: a refusal is no timeout.
            if isinstance(exc, NewConnectionError):
                raise ConnectionError("ConnectionError") from None
            raise TimeoutError from None
        except urllib3.exceptions.HTTPError:
            raise ConnectionError("ConnectionError") from None
        return ProviderAnswer(response.status, response.headers, response.data)

    def _request(
        self, method: str, path: str, params: dict[str, Any] | None = None, payload: Any = None
    ) -> ProviderAnswer:
        # The call's name without its ids or emails: bounded metric labels that leak nothing.
        call = f"{method} {path.split('/', 1)[0].split('?', 1)[0]}"
        for attempt in range(RETRY_AFTER_ATTEMPTS + 1):
            self.limiter.acquire()
            self.calls += 1
            started = time.monotonic()
            try:
                response = self._send(method, path, params, payload)
            except TimeoutError:
                self._observe(call, "timeout", started)
                raise TransientProviderError(f"{method} {path}: timed out after {self.timeout:g}s") from None
            except ConnectionError as exc:
                self._observe(call, "connection_error", started)
                raise TransientProviderError(f"{method} {path}: connection error ({exc})") from None
            self._observe(call, provider_outcome(response.status_code), started)
            if response.status_code != 429:
                return response
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is not None:
                # The provider throttles this host as a whole: every worker waits — at most
                # MAX_RETRY_AFTER_SECONDS, since every call to the host sleeps in the limiter
                # meanwhile, inside a task (far from the broker's visibility timeout).
                self.limiter.pause(min(retry_after, MAX_RETRY_AFTER_SECONDS))
            if retry_after is None or retry_after > MAX_RETRY_AFTER_SECONDS or attempt == RETRY_AFTER_ATTEMPTS:
                raise TransientProviderError(f"{method} {path}: HTTP 429", status=429, retry_after=retry_after)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _observe(self, call: str, outcome: str, started: float) -> None:
        upstream_call_observe(
            upstream="provider", host=self.host, call=call, outcome=outcome, seconds=time.monotonic() - started
        )

    @staticmethod
    def _raise_for(method: str, path: str, response: ProviderAnswer) -> None:
        status = response.status_code
        if status == 429 or status >= 500:
            raise TransientProviderError(f"{method} {path}: HTTP {status}", status=status)
        if status in TEAM_DEAD_STATUSES:
            meaning = "workspace deactivated" if status == 402 else "credentials refused"
            raise TeamDeadError(f"{method} {path}: HTTP {status} ({meaning})", status=status)
        if status >= 400:
            raise PermanentProviderError(f"{method} {path}: HTTP {status}", status=status)

    def _page(self, path: str, offset: int) -> tuple[list[dict], int]:
        response = self._request("GET", path, params={"offset": offset, "limit": self.page_size})
        if response.status_code != 200:
            self._raise_for("GET", path, response)
            raise TransientProviderError(f"GET {path}: unexpected HTTP {response.status_code}")
        try:
            payload = response.json()
        except (ValueError, json.JSONDecodeError):
            raise TransientProviderError(f"GET {path}: malformed answer (not JSON)") from None
        if not isinstance(payload, dict):
            raise TransientProviderError(f"GET {path}: malformed answer (not an object)")
        items, total = payload.get("items"), payload.get("total")
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise TransientProviderError(f"GET {path}: malformed answer (items is not a list of objects)")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise TransientProviderError(f"GET {path}: malformed answer (total is not a count)")
        return items, total

    def _list(self, path: str) -> list[dict]:
        collected: list[dict] = []
        offset = 0
        for _ in range(MAX_PAGES):
            items, total = self._page(path, offset)
            collected.extend(items)
            offset += len(items)
            if not items or offset >= total:
                return collected
        raise TransientProviderError(f"GET {path}: more than {MAX_PAGES} pages")

    @staticmethod
    def _email(item: dict, path: str) -> str:
        email = item.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise TransientProviderError(f"GET {path}: malformed answer (an item has no email)")
        return email.strip().lower()

    # -- the interface ---------------------------------------------------------------------------
    def list_members(self) -> list[ProviderMember]:
        members: dict[str, ProviderMember] = {}
        for item in self._list("members"):
            member_id = item.get("id")
            if not isinstance(member_id, str | int) or isinstance(member_id, bool) or member_id == "":
                raise TransientProviderError("GET members: malformed answer (an item has no id)")
            member = ProviderMember(
                id=str(member_id), email=self._email(item, "members"), joined_at=parse_timestamp(item.get("joined_at"))
            )
            members[member.id] = member  # a page boundary shifting under us must not count twice
        return list(members.values())

    def list_invites(self) -> list[ProviderInvite]:
        invites: dict[str, ProviderInvite] = {}
        for item in self._list("invites"):
            email = self._email(item, "invites")
            invites[email] = ProviderInvite(email=email, invited_at=parse_timestamp(item.get("invited_at")))
        return list(invites.values())

    def invite(self, email: str) -> None:
        response = self._request("POST", "invites", payload={"email": email})
        if response.status_code in (200, 201, 202, 204, 409):
            return
        self._raise_for("POST", "invites", response)
        raise TransientProviderError(f"POST invites: unexpected HTTP {response.status_code}")

    def remove_member(self, member_id: str) -> None:
        self._delete(f"members/{quote(str(member_id), safe='')}")

    def cancel_invite(self, email: str) -> None:
        self._delete(f"invites/{quote(email, safe='@')}")

    def _delete(self, path: str) -> None:
        response = self._request("DELETE", path)
        if response.status_code in (200, 202, 204, 404):
            return
        self._raise_for("DELETE", path, response)
        raise TransientProviderError(f"DELETE {path}: unexpected HTTP {response.status_code}")
