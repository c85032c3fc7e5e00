"""The one settings module. Everything comes from the environment (see README, DESIGN §2)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _
from kombu import Queue

from leasesite.env import (
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("LEASESITE_VAR_DIR", str(BASE_DIR / "var")))

# --- Django basics -------------------------------------------------------------------------
DEBUG = env_bool("DJANGO_DEBUG", True)
_DEV_SECRET_KEY = "django-insecure-leasesite-dev-only-key"  # noqa: S105 - refused when DEBUG is off
SECRET_KEY = env_str("DJANGO_SECRET_KEY") or _DEV_SECRET_KEY
if not DEBUG and (SECRET_KEY == _DEV_SECRET_KEY or len(SECRET_KEY) < 32):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY must be set to a random value of at least 32 characters when DJANGO_DEBUG is off"
    )
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# The container's own health probe asks http://127.0.0.1:8000/healthz; loopback names carry no
# risk here (no page builds absolute links from the Host header).
ALLOWED_HOSTS += [host for host in ("127.0.0.1", "localhost") if host not in ALLOWED_HOSTS]
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "leasesite.admin_site.LeasesiteAdminConfig",  # django.contrib.admin with the console's home page
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "axes",
    "leasesite",
    "tokens",
    "leases",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]
if not DEBUG:
    # Production serves collected static files through whitenoise (requirements/prod.txt);
    # with DEBUG on, runserver's staticfiles app does it.
    MIDDLEWARE.insert(1, "whitenoise.middleware.WhiteNoiseMiddleware")

ROOT_URLCONF = "leasesite.urls"
WSGI_APPLICATION = "leasesite.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "leasesite" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if not env_str("DATABASE_URL"):
    VAR_DIR.mkdir(parents=True, exist_ok=True)  # the embedded default lives under var/
DATABASES = {
    "default": parse_database_url(env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}", base_dir=BASE_DIR)
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# django-axes counts failed logins first and refuses a locked-out pair before any password check.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Admin login throttling: AXES_FAILURE_LIMIT failures of one user name from one address lock that
# pair out for AXES_COOLOFF_MINUTES. Per pair, not per user alone, so someone guessing from
# elsewhere cannot lock the real operator out; every failure and lockout is logged (axes.watch_login)
# and kept in admin → Axes.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# Log who and from where (the point of a lockout log); passwords are always masked by axes.
AXES_SENSITIVE_PARAMETERS: list[str] = []
AXES_LOCKOUT_CALLABLE = "leasesite.views.login_locked"
# The same client address as /redeem/ uses (REMOTE_ADDR, or the last X-Forwarded-For hop behind
# our own proxy when LEASE_REDEEM_TRUST_X_FORWARDED_FOR is on): never a header a client can forge.
AXES_CLIENT_IP_CALLABLE = "leasesite.clientip.login_client_address"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# --- Language and time ------------------------------------------------------------------------
# The operators' language comes from the environment, not from each browser's Accept-Language
# (so no LocaleMiddleware): a console in English on one laptop and Chinese on another helps nobody.
LANGUAGE_CODE = env_str("DJANGO_LANGUAGE_CODE", "zh-hans") or "zh-hans"
LANGUAGES = [("zh-hans", _("Simplified Chinese")), ("en", _("English"))]
# Translations live in each app's locale/ folder (zh_Hans), found through INSTALLED_APPS.
TIME_ZONE = env_str("DJANGO_TIME_ZONE", "Asia/Shanghai") or "Asia/Shanghai"
USE_I18N = True
USE_TZ = True  # data is stored in UTC; TIME_ZONE is for display and beat's crontabs

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

if not DEBUG:
    # Production defaults pass ``check --deploy --fail-level WARNING``. A deployment whose TLS ends
    # at a proxy sets DJANGO_BEHIND_TLS_PROXY (the proxy's X-Forwarded-Proto is trusted); one that
    # serves plain HTTP on a private network on purpose turns the switches below off.
    SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    # Probes and Prometheus talk plain HTTP to the container: never redirect them.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", True)
    if env_bool("DJANGO_BEHIND_TLS_PROXY", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# /metrics: with a token, only ``Authorization: Bearer <token>`` may read it; without one, only a
# development server (DJANGO_DEBUG on) answers (DESIGN §2).
METRICS_TOKEN = env_str("METRICS_TOKEN")

# --- Secrets at rest ------------------------------------------------------------------------------
TOKEN_ENCRYPTION_KEYS = env_list("TOKEN_ENCRYPTION_KEYS")
if not TOKEN_ENCRYPTION_KEYS:
    if not DEBUG:
        raise ImproperlyConfigured(
            "TOKEN_ENCRYPTION_KEYS is required when DJANGO_DEBUG is off. Generate one with: "
            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        )
    if not os.environ.get("LEASESITE_DEV_KEY_WARNED"):
        os.environ["LEASESITE_DEV_KEY_WARNED"] = "1"  # once per process tree, not once per child
        sys.stderr.write(
            "WARNING: TOKEN_ENCRYPTION_KEYS is not set: using a development key derived from "
            "DJANGO_SECRET_KEY. Set real Fernet keys before storing real tokens.\n"
        )
    TOKEN_ENCRYPTION_KEYS = [
        base64.urlsafe_b64encode(hashlib.sha256(f"leasesite-dev-token-key:{SECRET_KEY}".encode()).digest()).decode()
    ]
# The keyed hash that makes "the same token twice" detectable without decrypting every row.
# It must outlive encryption-key rotation, so it has its own (optional) key.
TOKEN_FINGERPRINT_KEY = (
    env_str("TOKEN_FINGERPRINT_KEY") or hashlib.sha256(f"leasesite-token-fingerprint:{SECRET_KEY}".encode()).hexdigest()
)

# --- Redis, Celery, beat ----------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
REDIS_URL = env_str("REDIS_URL") or (
    CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else ""
)
BROKER_DIR = VAR_DIR / "broker"
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "store_processed": False,
        "control_folder": str(BROKER_DIR / "control"),
    }
else:
    # Longer than the longest task time limit, so Redis does not redeliver a running task.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 4 * 3600}
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "celery") or "celery"
# The token refresh's long, rate-limited batches may go to a queue of their own, so that a
# dedicated worker pool works them while the default queue's workers stay free for what a person
# waits on (QR-login polls, invites after a redemption, seat frees) and for the lease engine.
# By default everything shares the default queue (one worker pool consumes it all).
CELERY_REFRESH_QUEUE = env_str("CELERY_REFRESH_QUEUE") or CELERY_TASK_DEFAULT_QUEUE
REFRESH_TASKS = ("tokens.refresh_tokens", "tokens.refresh_batch", "tokens.cleanup_tokens")
CELERY_TASK_ROUTES = {name: {"queue": CELERY_REFRESH_QUEUE} for name in REFRESH_TASKS}
# A worker started without -Q consumes every queue above; `-Q NAME` makes a dedicated one.
CELERY_TASK_QUEUES = [
    Queue(name, routing_key=name) for name in dict.fromkeys([CELERY_TASK_DEFAULT_QUEUE, CELERY_REFRESH_QUEUE])
]
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
# No results are stored, so beat needs no "celery.backend_cleanup" schedule (None: not installed).
CELERY_RESULT_EXPIRES = None
CELERY_TIMEZONE = TIME_ZONE
CELERY_ENABLE_UTC = True
CELERY_TASK_ACKS_LATE = True  # every task is idempotent, so redelivery after a crash is safe
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 3 * 3600, minimum=1)
CELERY_TASK_TIME_LIMIT = CELERY_TASK_SOFT_TIME_LIMIT + 300
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Keep Django's LOGGING (and its secret-scrubbing filter) in worker and beat processes.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
DJANGO_CELERY_BEAT_TZ_AWARE = True

# --- 报名工具 API ------------------------------------------------------------------------------
BAOMING_API_BASE = (
    env_str("BAOMING_API_BASE", "https://api-xcx-qunsou.weiyoubot.cn") or "https://api-xcx-qunsou.weiyoubot.cn"
).rstrip("/")
# The keep-alive call, exactly as the old refresh tool made it (its ``get_enroll_detail``):
# GET {BAOMING_API_BASE}{BAOMING_PROBE_PATH}?eid={BAOMING_PROBE_EID}&access_token=...&referer=&spider=h5
BAOMING_PROBE_PATH = env_str("BAOMING_PROBE_PATH") or "/xcx/enroll/v3/detail"
if not re.fullmatch(r"/[^\s?#]*", BAOMING_PROBE_PATH):
    raise ImproperlyConfigured(
        "BAOMING_PROBE_PATH must start with / and hold no spaces, ? or # (a path such as "
        f"/xcx/enroll/v3/detail), got {BAOMING_PROBE_PATH!r}"
    )
BAOMING_PROBE_EID = env_str("BAOMING_PROBE_EID") or "69844bcf8eaa2449c7a37fae"
if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", BAOMING_PROBE_EID):
    raise ImproperlyConfigured(
        f"BAOMING_PROBE_EID must be an event id of letters, digits, _ or - (at most 64), got {BAOMING_PROBE_EID!r}"
    )
# A failing answer whose message holds one of these words (compared in lower case) is "suspect":
# probably logged out. BAOMING_SUSPECT_LIMIT of them in a row, spanning at least an hour, delete
# the token (DESIGN §3). Empty: no answer is suspect (such answers are transient failures).
BAOMING_SUSPECT_MESSAGES = list(
    dict.fromkeys(
        word.lower() for word in env_list("BAOMING_SUSPECT_MESSAGES", ["登录", "过期", "失效", "无效", "token"])
    )
)
BAOMING_SUSPECT_LIMIT = env_int("BAOMING_SUSPECT_LIMIT", 3, minimum=2)
# Checks kept per token (the console's history of a token; older ones are deleted as new ones come).
TOKEN_HISTORY_PER_TOKEN = env_int("TOKEN_HISTORY_PER_TOKEN", 50, minimum=1)
BAOMING_RATE_LIMIT = env_float("BAOMING_RATE_LIMIT", 1.0, minimum=0, exclusive_minimum=True)
# The upper bound of checks in flight per process; a run sizes itself below it (tokens.services.refresh.
# check_concurrency). 32 reaches 400 req/s at 50 ms with 2 workers (15 each) with room for slower answers.
BAOMING_CONCURRENCY = env_int("BAOMING_CONCURRENCY", 32, minimum=1)
BAOMING_TIMEOUT = env_float("BAOMING_TIMEOUT", 10.0, minimum=0, exclusive_minimum=True)
# Seconds of lateness the shared rate limiter absorbs so the upstream never sees more than
# BAOMING_RATE_LIMIT requests in any one second (slots are (1 + this) / rate apart).
RATE_LIMIT_JITTER_ALLOWANCE = env_float("RATE_LIMIT_JITTER_ALLOWANCE", 0.05, minimum=0)
# How often one token is retried within a run after a rate-limit answer.
BAOMING_RATE_LIMIT_RETRIES = env_int("BAOMING_RATE_LIMIT_RETRIES", 3, minimum=0)
# Tokens per fan-out batch task (one batch is one task on one worker).
BAOMING_BATCH_SIZE = env_int("BAOMING_BATCH_SIZE", 200, minimum=1)
# Circuit breaker, for runs of any size: a run deletes nothing (and alerts) when more than this
# share of its definitive answers (valid + invalid) say "invalid" and at least
# BAOMING_BREAKER_MIN_INVALID answers do (so one dead token of one, or of three, is still deleted).
BAOMING_BREAKER_THRESHOLD = env_float("BAOMING_BREAKER_THRESHOLD", 0.5)
if not 0 < BAOMING_BREAKER_THRESHOLD < 1:
    raise ImproperlyConfigured(
        "BAOMING_BREAKER_THRESHOLD must be a share strictly between 0 and 1 (e.g. 0.5), "
        f"got {BAOMING_BREAKER_THRESHOLD}"
    )
BAOMING_BREAKER_MIN_INVALID = env_int("BAOMING_BREAKER_MIN_INVALID", 2, minimum=1)
if env_str("BAOMING_BREAKER_MIN_ANSWERS"):
    # Its rule let small runs (and the 6-hourly subset) delete every token: refuse it loudly
    # rather than ignore it silently.
    raise ImproperlyConfigured(
        "BAOMING_BREAKER_MIN_ANSWERS is no longer supported: the breaker now protects runs of any size; "
        "remove it (BAOMING_BREAKER_MIN_INVALID sets how many invalid answers can trip it, default 2)"
    )
# A refresh run's lock (and a batch's claim) expires if its owner stops renewing it for this long.
BAOMING_RUN_LOCK_TTL = env_int("BAOMING_RUN_LOCK_TTL", 600, minimum=10)
# The run sweeper (tokens.sweep_runs, every minute) sends again the batches of a run that showed
# no sign of life for this long, at most BAOMING_SWEEP_MAX_REDISPATCHES times each before it
# gives the run up as abandoned (and alerts).
BAOMING_SWEEP_GRACE_SECONDS = env_int("BAOMING_SWEEP_GRACE_SECONDS", 180, minimum=10)
BAOMING_SWEEP_MAX_REDISPATCHES = env_int("BAOMING_SWEEP_MAX_REDISPATCHES", 3, minimum=1)
# A QR-code login (add a token by scanning) gives up after this many seconds without a scan.
BAOMING_QR_TIMEOUT = env_int("BAOMING_QR_TIMEOUT", 180, minimum=30)
if BAOMING_QR_TIMEOUT > 3600:
    raise ImproperlyConfigured(f"BAOMING_QR_TIMEOUT must be at most 3600 seconds, got {BAOMING_QR_TIMEOUT}")
# BAOMING_API_BASE is the bundled fake (``start --demo``): the admin's scan page offers a
# "scan it for me" button that calls the fake's control endpoint. Honoured only for a loopback host.
BAOMING_API_IS_FAKE = env_bool("BAOMING_API_IS_FAKE", False)

# --- Seat leases (DESIGN §4-§7) -----------------------------------------------------------------
LEASE_PROVIDER_TIMEOUT = env_float("LEASE_PROVIDER_TIMEOUT", 10.0, minimum=0, exclusive_minimum=True)
LEASE_PROVIDER_PAGE_SIZE = env_int("LEASE_PROVIDER_PAGE_SIZE", 100, minimum=1)
# Requests per second to one team-provider host, all workers together (the shared limiter).
LEASE_PROVIDER_RATE_LIMIT = env_float("LEASE_PROVIDER_RATE_LIMIT", 5.0, minimum=0, exclusive_minimum=True)
# A pending lease missing from both the members and the invites listing this many syncs in a row
# is invited again.
LEASE_REINVITE_AFTER_MISSED_SYNCS = env_int("LEASE_REINVITE_AFTER_MISSED_SYNCS", 3, minimum=1)
# Transfer retries: exponential backoff with jitter, stored in next_attempt_at; after this many
# failed attempts the lease goes "failed" and people are alerted.
LEASE_TRANSFER_MAX_ATTEMPTS = env_int("LEASE_TRANSFER_MAX_ATTEMPTS", 5, minimum=1)
LEASE_TRANSFER_BACKOFF_SECONDS = env_float("LEASE_TRANSFER_BACKOFF_SECONDS", 60.0, minimum=0)
LEASE_TRANSFER_BACKOFF_MAX_SECONDS = env_float("LEASE_TRANSFER_BACKOFF_MAX_SECONDS", 3600.0, minimum=0)
# Leases one transfer run claims at a time, and how many it moves at once (threads per process).
LEASE_TRANSFER_BATCH_SIZE = env_int("LEASE_TRANSFER_BATCH_SIZE", 50, minimum=1)
LEASE_TRANSFER_CONCURRENCY = env_int("LEASE_TRANSFER_CONCURRENCY", 4, minimum=1)
# Teams one join sync reads and settles at once (threads; PostgreSQL only, SQLite syncs one by one).
LEASE_SYNC_CONCURRENCY = env_int("LEASE_SYNC_CONCURRENCY", 4, minimum=1, maximum=64)
# A worker's claim on a lease lapses after this long, so a crashed transfer is resumed.
LEASE_CLAIM_TTL = env_int("LEASE_CLAIM_TTL", 300, minimum=10)
# Port of the fake team provider that ``start --demo`` runs (the demo teams point at it).
DEMO_PROVIDER_PORT = env_int("DEMO_PROVIDER_PORT", 8766, minimum=1)
# The public redemption page: attempts per client address per window.
LEASE_REDEEM_RATE_LIMIT = env_int("LEASE_REDEEM_RATE_LIMIT", 10, minimum=1)
LEASE_REDEEM_RATE_WINDOW = env_int("LEASE_REDEEM_RATE_WINDOW", 600, minimum=1)
# Behind a reverse proxy, the client address is the last hop of X-Forwarded-For.
LEASE_REDEEM_TRUST_X_FORWARDED_FOR = env_bool("LEASE_REDEEM_TRUST_X_FORWARDED_FOR", False)
# A code redeemed by the email of a lease that expired at most this many days ago continues it: a
# fresh lease, in the team it was last in when that team has a free seat (DESIGN §5).
LEASE_RENEWAL_GRACE_DAYS = env_int("LEASE_RENEWAL_GRACE_DAYS", 7, minimum=0, maximum=3650)
# An alert (once per change) when a pool's free seats fall below this, or its waiting list grows.
LEASE_LOW_SEATS = env_int("LEASE_LOW_SEATS", 3, minimum=0, maximum=100_000)

# --- Alerts -----------------------------------------------------------------------------------------
NOTIFY_URLS = env_list("NOTIFY_URLS")
# The same alert key is sent at most once per this many seconds (leasesite.notify).
ALERT_DEDUP_SECONDS = env_int("ALERT_DEDUP_SECONDS", 3600, minimum=0)

# --- Logging ----------------------------------------------------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper() or "INFO"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "client_errors_one_line": {"()": "leasesite.log_filters.ClientErrorOneLineFilter"},
        "scrub_secrets": {"()": "leasesite.log_filters.SecretScrubFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["client_errors_one_line", "scrub_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # urllib3 logs full request URLs (with access_token) at DEBUG: keep it quiet.
        "urllib3": {"level": "WARNING"},
        "django.db.backends": {"level": "INFO"},
    },
}

# --- Customer mail and reminders (DESIGN §2) --------------------------------------------------------
_EMAIL_SCHEMES = {"smtp": (25, False, False), "smtp+tls": (587, True, False), "smtp+ssl": (465, False, True)}
_EMAIL_URL_HINT = (
    "EMAIL_URL must look like smtp://user:password@host:port, smtp+tls://... or smtp+ssl://... "
    "(percent-encode @ : / ? # in the user name and password)"
)


def _email_settings(url: str) -> tuple[str, str, int, str, str, bool, bool]:
    """``EMAIL_URL`` → (backend, host, port, user, password, use_tls, use_ssl). Errors never quote
    the URL or any part of its user:password@host:port: a malformed one may hold the password
    where the host or port should be."""
    from urllib.parse import unquote, urlsplit

    if not url:
        return "django.core.mail.backends.console.EmailBackend", "localhost", 25, "", "", False, False
    if "://" not in url:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; it has no scheme")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _EMAIL_SCHEMES:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; scheme {scheme[:20]!r} is not supported")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; its host or port is malformed (port: 1-65535)") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; it must not have a path, query or fragment")
    if not parts.hostname:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; it names no host")
    if port == 0:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; its port must be 1-65535")
    if parts.password and not parts.username:
        raise ImproperlyConfigured(f"{_EMAIL_URL_HINT}; it has a password but no user name")
    default_port, use_tls, use_ssl = _EMAIL_SCHEMES[scheme]
    return (
        "django.core.mail.backends.smtp.EmailBackend",
        parts.hostname,
        port or default_port,
        unquote(parts.username or ""),
        unquote(parts.password or ""),
        use_tls,
        use_ssl,
    )


# Outgoing mail to customers. Unset: the console backend prints every mail to the log.
(
    EMAIL_BACKEND,
    EMAIL_HOST,
    EMAIL_PORT,
    EMAIL_HOST_USER,
    EMAIL_HOST_PASSWORD,
    EMAIL_USE_TLS,
    EMAIL_USE_SSL,
) = _email_settings(env_str("EMAIL_URL"))
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10, minimum=1, maximum=600)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL") or "leasesite <noreply@localhost>"
if "@" not in DEFAULT_FROM_EMAIL or "\n" in DEFAULT_FROM_EMAIL or "\r" in DEFAULT_FROM_EMAIL:
    raise ImproperlyConfigured(
        f"DEFAULT_FROM_EMAIL must be an address such as 'leasesite <noreply@example.com>', got {DEFAULT_FROM_EMAIL!r}"
    )
# Links in customer mails are absolute: the site's public address (where /redeem/ is served).
LEASE_PUBLIC_BASE_URL = (env_str("LEASE_PUBLIC_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
if not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", LEASE_PUBLIC_BASE_URL):
    raise ImproperlyConfigured(
        "LEASE_PUBLIC_BASE_URL must be the site's public address, http(s)://host[:port][/path] without query "
        f"or fragment (e.g. https://seats.example.com), got {LEASE_PUBLIC_BASE_URL!r}"
    )
# Days before a lease's ends_at that its customer gets a reminder mail, largest first. Blank: 7,3,1.
_reminder_days = env_list("LEASE_REMINDER_DAYS") or ["7", "3", "1"]
if len(_reminder_days) > 10 or not all(re.fullmatch(r"[0-9]{1,3}", d) and 1 <= int(d) <= 365 for d in _reminder_days):
    raise ImproperlyConfigured(
        "LEASE_REMINDER_DAYS must be at most 10 comma-separated whole days between 1 and 365 (e.g. 7,3,1), "
        f"got {env_str('LEASE_REMINDER_DAYS')!r}"
    )
LEASE_REMINDER_DAYS = sorted({int(d) for d in _reminder_days}, reverse=True)
# A pending lease whose invitation is this many days old gets one "accept your invitation" mail
# (one more after each new invitation); 0: none.
LEASE_ACCEPT_REMINDER_DAYS = env_int("LEASE_ACCEPT_REMINDER_DAYS", 3, minimum=0, maximum=365)
# A reminder run with at least this many failed mails alerts (once per ALERT_DEDUP_SECONDS).
LEASE_REMINDER_FAILURE_ALERT = env_int("LEASE_REMINDER_FAILURE_ALERT", 5, minimum=1)
