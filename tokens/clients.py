"""The one HTTP client for the 报名工具 API (DESIGN §3, UPSTREAM.md).

Every answer is classified as valid / invalid / rate-limited / transient. Only an explicit
"invalid access_token" message or HTTP 401 is INVALID; anything unexpected is TRANSIENT, so a
misbehaving upstream can never make us delete a token. Nothing this module returns or raises
contains the plaintext token.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

from leasesite.log_filters import scrub_secrets

DETAIL_PATH = "/xcx/enroll/v2/detail"
INVALID_MARKER = "invalid access_token"
THROTTLE_MARKER = "请求过于频繁"
MAX_RETRY_AFTER_SECONDS = 300.0
MAX_MESSAGE_CHARS = 200


class CheckOutcome(enum.StrEnum):
    VALID = "valid"
    INVALID = "invalid"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"


@dataclass(frozen=True)
class CheckResult:
    outcome: CheckOutcome
    message: str
    http_status: int | None = None
    retry_after: float | None = None
    elapsed: float = 0.0
    # The upstream gave a real answer about the token: valid, invalid, or an HTTP 200 JSON
    # business answer. A timeout, connection error, 5xx, 429 or garbage is no answer: it says
    # something about the upstream (or us), nothing about the token.
    answered: bool = False


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), clamped to [0, 300]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER_SECONDS))


def _short(text: str) -> str:
    text = scrub_secrets(" ".join(text.split()))
    return text[:MAX_MESSAGE_CHARS]


def classify_response(status: int, headers: Any, body: bytes) -> CheckResult:
    """Pure classification of one HTTP answer of the enroll-detail endpoint."""
    retry_after = parse_retry_after(headers.get("Retry-After") if headers is not None else None)
    if status == 429:
        return CheckResult(CheckOutcome.RATE_LIMITED, "HTTP 429", status, retry_after)
    if status == 401:
        return CheckResult(CheckOutcome.INVALID, "HTTP 401", status, answered=True)
    if status >= 500:
        return CheckResult(CheckOutcome.TRANSIENT, f"HTTP {status}", status)

    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return CheckResult(CheckOutcome.TRANSIENT, f"HTTP {status}: answer is not JSON", status)
    if not isinstance(payload, dict):
        return CheckResult(CheckOutcome.TRANSIENT, f"HTTP {status}: JSON answer is not an object", status)

    msg = payload.get("msg")
    sta = payload.get("sta")
    msg_text = msg if isinstance(msg, str) else ""
    if INVALID_MARKER in msg_text.lower():
        return CheckResult(CheckOutcome.INVALID, _short(msg_text), status, answered=True)
    if THROTTLE_MARKER in msg_text:
        return CheckResult(CheckOutcome.RATE_LIMITED, _short(msg_text), status, retry_after)
    if status != 200:
        return CheckResult(CheckOutcome.TRANSIENT, f"HTTP {status}: {_short(msg_text)}".rstrip(": "), status)
    if msg is not None and not isinstance(msg, str):
        return CheckResult(CheckOutcome.TRANSIENT, "unexpected answer: msg is not a string", status)
    # ``sta`` must be a real integer (bool is an int subclass in Python, and not one here).
    if isinstance(sta, int) and not isinstance(sta, bool):
        if sta == 0:
            return CheckResult(CheckOutcome.VALID, _short(msg_text) or "ok", status, answered=True)
        # A business answer (e.g. 报名未开始): the upstream knows the token, it did not vouch for it.
        return CheckResult(CheckOutcome.TRANSIENT, f"sta={sta}: {_short(msg_text)}".rstrip(": "), status, answered=True)
    if sta is None and msg_text.strip().lower() == "ok":
        return CheckResult(CheckOutcome.VALID, "ok", status, answered=True)
    return CheckResult(CheckOutcome.TRANSIENT, "unexpected answer: no integer sta", status)


def _connection_error_reason(exc: requests.ConnectionError) -> str:
    # With a urllib3 Retry on the adapter, a read timeout surfaces as ConnectionError(MaxRetryError).
    inner = exc.args[0] if exc.args else None
    reason = getattr(inner, "reason", inner)
    if "refused" in str(exc).lower():
        return "connection refused"
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2, so rule it out first.
    if isinstance(reason, ReadTimeoutError | ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
        return "timeout"
    return "connection error"


class BaomingClient:
    """Reuses one ``requests.Session`` (connection pool sized to the concurrency)."""

    def __init__(
        self,
        *,
        base_url: str,
        probe_eid: str = "",
        timeout: float = 10.0,
        pool_size: int = 8,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.probe_eid = probe_eid
        self.timeout = timeout
        self.session = requests.Session()
        # Retry only failed connection attempts (the request never reached the upstream);
        # answers are never retried here: that is the rate limiter's and the run's job.
        retry = Retry(
            total=1,
            connect=1,
            read=0,
            status=0,
            other=0,
            redirect=0,
            backoff_factor=0.2,
            respect_retry_after_header=False,  # a 429 is classified by us, not retried by urllib3
        )
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=max(pool_size, 1), max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "leasesite-token-keepalive/1.0"

    def check_token(self, token: str) -> CheckResult:
        params = {"access_token": token}
        if self.probe_eid:
            params["eid"] = self.probe_eid
        started = time.monotonic()
        try:
            response = self.session.get(
                self.base_url + DETAIL_PATH,
                params=params,
                timeout=(min(self.timeout, 5.0), self.timeout),
                allow_redirects=False,
            )
            body = response.content
        except requests.Timeout:
            return CheckResult(CheckOutcome.TRANSIENT, "timeout", None, None, time.monotonic() - started)
        except requests.ConnectionError as exc:
            return CheckResult(
                CheckOutcome.TRANSIENT, _connection_error_reason(exc), None, None, time.monotonic() - started
            )
        except requests.RequestException as exc:
            return CheckResult(
                CheckOutcome.TRANSIENT,
                f"request error: {type(exc).__name__}",
                None,
                None,
                time.monotonic() - started,
            )
        result = classify_response(response.status_code, response.headers, body)
        return dataclasses.replace(result, elapsed=time.monotonic() - started)

    def close(self) -> None:
        self.session.close()


@lru_cache(maxsize=4)
def _cached_client(base_url: str, probe_eid: str, timeout: float, pool_size: int) -> BaomingClient:
    return BaomingClient(base_url=base_url, probe_eid=probe_eid, timeout=timeout, pool_size=pool_size)


def get_baoming_client() -> BaomingClient:
    """The process-wide client for the configured upstream (connections are reused)."""
    return _cached_client(
        settings.BAOMING_API_BASE,
        settings.BAOMING_PROBE_EID,
        settings.BAOMING_TIMEOUT,
        settings.BAOMING_CONCURRENCY,
    )
