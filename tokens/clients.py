"""The one HTTP client for the 报名工具 API (DESIGN §3, UPSTREAM.md).

The keep-alive call is the old refresh tool's ``get_enroll_detail``, exactly:
``GET {base}{BAOMING_PROBE_PATH}?eid={BAOMING_PROBE_EID}&access_token=...&referer=&spider=h5``.

Every answer is classified as valid / invalid / suspect / rate-limited / transient. HTTP 200 with
``sta == 0`` is VALID whatever its message (``未找到已有报名记录`` is a valid token not enrolled in
the event). Only an explicit "invalid access_token" message or HTTP 401 is INVALID; a failing
answer that sounds logged out (a word of BAOMING_SUSPECT_MESSAGES) is SUSPECT, which deletes
nothing by itself; anything unexpected is TRANSIENT, so a misbehaving upstream can never make us
delete a token. Nothing this module returns or raises contains the plaintext token.
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

# The old tool's call and the words it deleted tokens on (the defaults of the settings).
DEFAULT_PROBE_PATH = "/xcx/enroll/v3/detail"
DEFAULT_PROBE_EID = "69844bcf8eaa2449c7a37fae"
DEFAULT_SUSPECT_WORDS = ("登录", "过期", "失效", "无效", "token")
INVALID_MARKER = "invalid access_token"
THROTTLE_MARKER = "请求过于频繁"
MAX_RETRY_AFTER_SECONDS = 300.0
MAX_MESSAGE_CHARS = 200


class CheckOutcome(enum.StrEnum):
    VALID = "valid"
    INVALID = "invalid"
    SUSPECT = "suspect"  # a failing answer that sounds logged out: counted, deletes nothing alone
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


def classify_response(
    status: int, headers: Any, body: bytes, *, suspect_words: tuple[str, ...] = DEFAULT_SUSPECT_WORDS
) -> CheckResult:
    """Pure classification of one HTTP answer of the enroll-detail endpoint.

    ``suspect_words`` are compared with the message in lower case (the old tool did so).
    """
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
    # ``sta`` must be a real integer (bool is an int subclass in Python, and not one here).
    sta_is_int = isinstance(sta, int) and not isinstance(sta, bool)
    if status == 200 and sta_is_int and sta == 0:
        # Valid whatever the message, as the old tool took it: "ok", or "未找到已有报名记录"
        # (data null) for a token that is simply not enrolled in the probed event.
        return CheckResult(CheckOutcome.VALID, _short(msg_text) or "ok", status, answered=True)
    if INVALID_MARKER in msg_text.lower():
        return CheckResult(CheckOutcome.INVALID, _short(msg_text), status, answered=True)
    if THROTTLE_MARKER in msg_text:
        return CheckResult(CheckOutcome.RATE_LIMITED, _short(msg_text), status, retry_after)
    if status != 200:
        return CheckResult(CheckOutcome.TRANSIENT, f"HTTP {status}: {_short(msg_text)}".rstrip(": "), status)
    if msg is not None and not isinstance(msg, str):
        return CheckResult(CheckOutcome.TRANSIENT, "unexpected answer: msg is not a string", status)
    if sta_is_int:
        message = f"sta={sta}: {_short(msg_text)}".rstrip(": ")[:MAX_MESSAGE_CHARS]
        lowered = msg_text.lower()
        if any(word in lowered for word in suspect_words):
            # Sounds logged out ("登录已过期"): the old tool deleted on it at once; we count it.
            return CheckResult(CheckOutcome.SUSPECT, message, status, answered=True)
        # A business answer (e.g. 报名未开始): the upstream knows the token, it did not vouch for it.
        return CheckResult(CheckOutcome.TRANSIENT, message, status, answered=True)
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
        probe_path: str = DEFAULT_PROBE_PATH,
        probe_eid: str = DEFAULT_PROBE_EID,
        suspect_words: tuple[str, ...] = DEFAULT_SUSPECT_WORDS,
        timeout: float = 10.0,
        pool_size: int = 8,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.probe_url = self.base_url + probe_path
        self.probe_eid = probe_eid
        self.suspect_words = tuple(word.lower() for word in suspect_words)
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
        # In the old tool's order; referer is sent, empty.
        params = {"eid": self.probe_eid, "access_token": token, "referer": "", "spider": "h5"}
        started = time.monotonic()
        try:
            response = self.session.get(
                self.probe_url,
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
        result = classify_response(response.status_code, response.headers, body, suspect_words=self.suspect_words)
        return dataclasses.replace(result, elapsed=time.monotonic() - started)

    def close(self) -> None:
        self.session.close()


@lru_cache(maxsize=4)
def _cached_client(
    base_url: str, probe_path: str, probe_eid: str, suspect_words: tuple[str, ...], timeout: float, pool_size: int
) -> BaomingClient:
    return BaomingClient(
        base_url=base_url,
        probe_path=probe_path,
        probe_eid=probe_eid,
        suspect_words=suspect_words,
        timeout=timeout,
        pool_size=pool_size,
    )


def get_baoming_client() -> BaomingClient:
    """The process-wide client for the configured upstream (connections are reused)."""
    return _cached_client(
        settings.BAOMING_API_BASE,
        settings.BAOMING_PROBE_PATH,
        settings.BAOMING_PROBE_EID,
        tuple(settings.BAOMING_SUSPECT_MESSAGES),
        settings.BAOMING_TIMEOUT,
        settings.BAOMING_CONCURRENCY,
    )
