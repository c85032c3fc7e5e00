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

import base64
import binascii
import dataclasses
import enum
import json
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import requests
import urllib3
from django.conf import settings
from requests import certs
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

from leasesite.log_filters import scrub_secrets
from leasesite.upstream_metrics import upstream_call_observe, upstream_host

# The old tool's call and the words it deleted tokens on (the defaults of the settings).
DEFAULT_PROBE_PATH = "/xcx/enroll/v3/detail"
DEFAULT_PROBE_EID = "69844bcf8eaa2449c7a37fae"
DEFAULT_SUSPECT_WORDS = ("登录", "过期", "失效", "无效", "token")
INVALID_MARKER = "invalid access_token"
THROTTLE_MARKER = "请求过于频繁"
MAX_RETRY_AFTER_SECONDS = 300.0
MAX_MESSAGE_CHARS = 200
LATENCY_EWMA_WEIGHT = 0.1  # weight of the newest check in the latency estimate


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


def _urllib3_reason(error: BaseException | None) -> str:
    """A urllib3 failure of the keep-alive check, in the words of ``_connection_error_reason``."""
    if "refused" in str(error).lower():
        return "connection refused"
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2, so rule it out first.
    if isinstance(error, NewConnectionError):
        return "connection error"
    if isinstance(error, ReadTimeoutError | urllib3.exceptions.TimeoutError):
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
        self.host = upstream_host(self.base_url)
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
        # The keep-alive check is the hot path of a run (thousands per second across workers): it
        # goes straight to the urllib3 connection pool under requests (the same transport, the
        # same Retry), skipping requests' per-call layers, which cost ~3x the CPU — above all
        # re-reading the whole environment for proxy settings on every call. Only when the
        # environment names a proxy for the upstream does the check take the Session's way.
        environment = self.session.merge_environment_settings(self.probe_url, {}, None, None, None)
        self._check_pool: urllib3.HTTPConnectionPool | None = None
        if not environment.get("proxies"):
            verify = environment.get("verify")
            options: dict[str, Any] = {}
            if self.probe_url.startswith("https://"):
                options = {
                    "cert_reqs": "CERT_REQUIRED",
                    "ca_certs": verify if isinstance(verify, str) else certs.where(),
                }
            self._check_pool = urllib3.connection_from_url(
                self.probe_url, maxsize=max(pool_size, 1), block=False, retries=retry, **options
            )
        self._check_headers = {**self.session.headers}
        self._check_timeout = urllib3.Timeout(connect=min(self.timeout, 5.0), read=self.timeout)
        self._timeouts = (min(self.timeout, 5.0), self.timeout)
        # The keep-alive URL up to the token, in the old tool's order (referer sent, empty).
        query = f"?{urlencode({'eid': self.probe_eid})}&access_token="
        self._probe_prefix = f"{self.probe_url}{query}"
        self._probe_path_prefix = f"{urlsplit(self.probe_url).path}{query}"
        self._latency: float | None = None

    @property
    def latency(self) -> float | None:
        """Recent seconds per check in this process (an EWMA of the last ~20), None before any."""
        return self._latency

    def check_token(self, token: str) -> CheckResult:
        result = self._check_token(token)
        upstream_call_observe(
            upstream="baoming", host=self.host, call="check", outcome=result.outcome.value, seconds=result.elapsed
        )
        previous = self._latency  # a lost update between threads is harmless: it is an estimate
        self._latency = (
            result.elapsed if previous is None else previous + LATENCY_EWMA_WEIGHT * (result.elapsed - previous)
        )
        return result

    def _check_token(self, token: str) -> CheckResult:
        # GET {probe}?eid=...&access_token=...&referer=&spider=h5, encoded as requests' params were.
        suffix = f"{quote_plus(token)}&referer=&spider=h5"
        started = time.monotonic()
        if self._check_pool is None:
            return self._check_token_by_session(self._probe_prefix + suffix, started)
        try:
            response = self._check_pool.urlopen(
                "GET",
                self._probe_path_prefix + suffix,
                headers=self._check_headers,
                timeout=self._check_timeout,
                redirect=False,
                preload_content=True,
            )
        except urllib3.exceptions.MaxRetryError as exc:
            return CheckResult(
                CheckOutcome.TRANSIENT, _urllib3_reason(exc.reason), None, None, time.monotonic() - started
            )
        except urllib3.exceptions.HTTPError as exc:  # timeouts, resets, protocol errors
            return CheckResult(CheckOutcome.TRANSIENT, _urllib3_reason(exc), None, None, time.monotonic() - started)
        result = classify_response(response.status, response.headers, response.data, suspect_words=self.suspect_words)
        return dataclasses.replace(result, elapsed=time.monotonic() - started)

    def _check_token_by_session(self, url: str, started: float) -> CheckResult:
        try:
            response = self.session.get(url, timeout=self._timeouts, allow_redirects=False)
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
        if self._check_pool is not None:
            self._check_pool.close()
        self.session.close()

    # --- QR login (DESIGN §3): pc_code and pc_login ------------------------------------------

    def qr_code(self) -> QrCodeAnswer:
        """``GET pc_code``: a new QR code to show and its login code.

        Raises ``QrCodeError`` (``refused`` when the upstream said no in a JSON answer,
        otherwise a transient failure worth another try)."""
        response, error = self._qr_get(QR_CODE_PATH, params=None, call="qr_code")
        if response is None:
            raise QrCodeError(error)
        return parse_qr_code_answer(response.status_code, response.content)

    def qr_login_poll(self, code: str) -> QrPollResult:
        """``GET pc_login`` once. Never raises: no answer, or a garbled one, is ``NO_ANSWER``."""
        response, error = self._qr_get(QR_LOGIN_PATH, params={"code": code, "source": "h5"}, call="qr_login")
        if response is None:
            return QrPollResult(QrPollOutcome.NO_ANSWER, error)
        return classify_qr_login_answer(response.status_code, response.content)

    def _qr_get(self, path: str, *, params: dict[str, str] | None, call: str) -> tuple[requests.Response | None, str]:
        """One GET; (response, "") or (None, why not). The reason never holds the URL (the login
        code travels in it)."""
        started = time.monotonic()
        response, error = self._qr_get_once(path, params=params)
        outcome = f"http_{response.status_code // 100}xx" if response is not None else "no_answer"
        upstream_call_observe(
            upstream="baoming", host=self.host, call=call, outcome=outcome, seconds=time.monotonic() - started
        )
        return response, error

    def _qr_get_once(self, path: str, *, params: dict[str, str] | None) -> tuple[requests.Response | None, str]:
        try:
            response = self.session.get(
                self.base_url + path,
                params=params,
                timeout=(min(self.timeout, 5.0), self.timeout),
                allow_redirects=False,
            )
            response.content  # noqa: B018 - read the body inside the try: a reset mid-body is a connection error
        except requests.Timeout:
            return None, "timeout"
        except requests.ConnectionError as exc:
            return None, _connection_error_reason(exc)
        except requests.RequestException as exc:
            return None, f"request error: {type(exc).__name__}"
        return response, ""


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


# --- QR login answers (DESIGN §3, UPSTREAM.md) ------------------------------------------------
# Everything unexpected is "no answer" (keep waiting until the login expires), never a crash;
# only a JSON answer with another ``sta`` ends a login early.

QR_CODE_PATH = "/xcx/enroll_web/v1/pc_code"
QR_LOGIN_PATH = "/xcx/enroll_web/v1/pc_login"
QR_WAIT_MESSAGE = "please wait"
MAX_QR_ANSWER_BYTES = 2_000_000  # a data:image picture is a few kilobytes
MAX_QR_TEXT_BYTES = 2000  # a QR code (error correction M) holds up to 2331 bytes
MAX_LOGIN_CODE_CHARS = 500
MAX_IDENTITY_CHARS = 100  # BaomingToken.user_name / unionid
MAX_AVATAR_URL_CHARS = 500  # BaomingToken.avatar_url
_ACCESS_TOKEN = re.compile(r"^[0-9a-f]{32}$")
_DATA_IMAGE = re.compile(r"^data:image/(png|jpeg|jpg|gif|webp|bmp);base64,([A-Za-z0-9+/=\s]+)$", re.IGNORECASE)
_IMAGE_MAGIC = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg", b"GIF8": "gif"}


class QrCodeError(Exception):
    """``pc_code`` gave no QR code. ``refused``: the upstream said no (a JSON answer with another
    ``sta``); otherwise it could not be reached or answered garbage (try again)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused


@dataclass(frozen=True)
class QrCodeAnswer:
    qrcode: str  # a URL (or other text) to encode, or a data:image/...;base64 picture to show as is
    code: str = dataclasses.field(repr=False)  # collects the token: a secret

    @property
    def is_picture(self) -> bool:
        return self.qrcode.startswith("data:image/")


class QrPollOutcome(enum.StrEnum):
    WAITING = "waiting"  # not scanned yet
    LOGGED_IN = "logged_in"
    REFUSED = "refused"  # expired or refused by the upstream: start again
    NO_ANSWER = "no_answer"  # network error, 5xx, 429, garbage: keep waiting


@dataclass(frozen=True)
class QrIdentity:
    """Who logged in: the new token and the WeChat identity beside it."""

    access_token: str = dataclasses.field(repr=False)
    uname: str = ""
    pic: str = ""
    unionid: str | None = None


@dataclass(frozen=True)
class QrPollResult:
    outcome: QrPollOutcome
    message: str
    identity: QrIdentity | None = None


def _clean_text(value: object, *, limit: int) -> str:
    """A display string from an answer field: control characters dropped, trimmed, capped."""
    if not isinstance(value, str):
        return ""
    text = "".join(char for char in value if char.isprintable() or char == " ").strip()
    return text[:limit]


def _http_url(value: object, *, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    value = value.strip()
    if len(value) > limit or not value.lower().startswith(("http://", "https://")):
        return ""
    if any(char.isspace() or not char.isprintable() for char in value):
        return ""
    return value


def _picture_from_base64(text: str) -> str | None:
    """A bare base64 PNG/JPEG/GIF (older web clients got the picture without the data: prefix)."""
    if len(text) < 16 or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", text):
        return None
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    for magic, kind in _IMAGE_MAGIC.items():
        if raw.startswith(magic):
            return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"
    return None


def normalize_qrcode(value: object) -> str | None:
    """``data.qrcode`` as something we can show: a checked ``data:image`` picture, an http(s) URL
    or other short text to encode; None when it is neither."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    match = _DATA_IMAGE.fullmatch(value)
    if match:
        payload = "".join(match.group(2).split())
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return None
        kind = match.group(1).lower()
        return f"data:image/{'jpeg' if kind == 'jpg' else kind};base64,{payload}"
    if value.lower().startswith("data:"):
        return None  # a data: URL that is not a picture we show
    picture = _picture_from_base64(value)
    if picture is not None:
        return picture
    if len(value.encode()) > MAX_QR_TEXT_BYTES or any(not char.isprintable() for char in value):
        return None
    return value


def _json_object(body: bytes) -> dict | None:
    if len(body) > MAX_QR_ANSWER_BYTES:
        return None
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _sta(payload: dict) -> int | None:
    sta = payload.get("sta")
    return sta if isinstance(sta, int) and not isinstance(sta, bool) else None


def _answer_ok(payload: dict, msg: str) -> bool:
    sta = _sta(payload)
    return sta == 0 or (sta is None and "sta" not in payload and msg.strip().lower() == "ok")


def parse_qr_code_answer(status: int, body: bytes) -> QrCodeAnswer:
    """Pure parsing of a ``pc_code`` answer; raises ``QrCodeError``."""
    if status != 200:
        raise QrCodeError(f"HTTP {status}")
    payload = _json_object(body)
    if payload is None:
        raise QrCodeError(f"HTTP {status}: answer is not a JSON object")
    msg = payload.get("msg") if isinstance(payload.get("msg"), str) else ""
    if THROTTLE_MARKER in msg:
        raise QrCodeError(_short(msg))
    if not _answer_ok(payload, msg):
        sta = _sta(payload)
        if sta is None:
            raise QrCodeError("unexpected answer: no integer sta")
        raise QrCodeError(f"sta={sta}: {_short(msg)}".rstrip(": "), refused=True)
    data = payload.get("data")
    if not isinstance(data, dict):
        raise QrCodeError("unexpected answer: no data")
    qrcode = normalize_qrcode(data.get("qrcode"))
    code = data.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    if qrcode is None:
        raise QrCodeError("unexpected answer: data.qrcode is neither a picture nor text to encode")
    if not isinstance(code, str) or not code.strip() or len(code) > MAX_LOGIN_CODE_CHARS:
        raise QrCodeError("unexpected answer: no usable data.code")
    if any(char.isspace() or not char.isprintable() for char in code.strip()):
        raise QrCodeError("unexpected answer: no usable data.code")
    return QrCodeAnswer(qrcode=qrcode, code=code.strip())


def parse_qr_identity(data: object) -> QrIdentity | None:
    """``data`` of a logged-in ``pc_login`` answer; None without a well-formed access token."""
    if not isinstance(data, dict):
        return None
    token = data.get("access_token")
    if not isinstance(token, str) or not _ACCESS_TOKEN.fullmatch(token.strip().lower()):
        return None
    unionid = _clean_text(data.get("unionid"), limit=MAX_IDENTITY_CHARS + 1)
    if len(unionid) > MAX_IDENTITY_CHARS or any(char.isspace() for char in unionid):
        unionid = ""  # not an id we can key on: keep the token, skip the identity
    return QrIdentity(
        access_token=token.strip().lower(),
        uname=_clean_text(data.get("uname"), limit=MAX_IDENTITY_CHARS),
        pic=_http_url(data.get("pic"), limit=MAX_AVATAR_URL_CHARS),
        unionid=unionid or None,
    )


def classify_qr_login_answer(status: int, body: bytes) -> QrPollResult:
    """Pure classification of one ``pc_login`` answer (its message never holds the token)."""
    if status != 200:
        return QrPollResult(QrPollOutcome.NO_ANSWER, f"HTTP {status}")
    payload = _json_object(body)
    if payload is None:
        return QrPollResult(QrPollOutcome.NO_ANSWER, f"HTTP {status}: answer is not a JSON object")
    msg = payload.get("msg") if isinstance(payload.get("msg"), str) else ""
    sta = _sta(payload)
    if THROTTLE_MARKER in msg:
        return QrPollResult(QrPollOutcome.NO_ANSWER, _short(msg))
    if sta == -1 or msg.strip().lower() == QR_WAIT_MESSAGE:
        return QrPollResult(QrPollOutcome.WAITING, _short(msg) or QR_WAIT_MESSAGE)
    if _answer_ok(payload, msg):
        identity = parse_qr_identity(payload.get("data"))
        if identity is None:
            return QrPollResult(QrPollOutcome.NO_ANSWER, "logged in, but the answer holds no valid access_token")
        return QrPollResult(QrPollOutcome.LOGGED_IN, "ok", identity)
    if sta is None:
        return QrPollResult(QrPollOutcome.NO_ANSWER, "unexpected answer: no integer sta")
    return QrPollResult(QrPollOutcome.REFUSED, f"sta={sta}: {_short(msg)}".rstrip(": "))
