"""Test settings: the real settings module, fed a test environment first.

Tests use real services: Redis on 127.0.0.1:6379 (rate limiter, and the broker of the worker
integration tests) and, when ``DATABASE_URL`` names it, PostgreSQL. ``.ci/run`` runs the suite once
on SQLite and once on PostgreSQL.
"""

import os
import uuid
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
_VAR = Path(os.environ.get("LEASESITE_TEST_VAR_DIR", _BASE / "var" / "test"))
_VAR.mkdir(parents=True, exist_ok=True)

os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-that-is-long-enough-0123456789")
os.environ.setdefault("TOKEN_ENCRYPTION_KEYS", "mTRq9gqYRrDk2PvhVW7vOfOFbyGa0rLtFRMA_V6HAHI=")
os.environ.setdefault("LEASESITE_VAR_DIR", str(_VAR))
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")
# A queue of our own, so a stray worker of another checkout never takes our test tasks.
os.environ.setdefault("CELERY_TASK_DEFAULT_QUEUE", f"leasesite-test-{uuid.uuid4().hex[:12]}")
os.environ.setdefault("BAOMING_API_BASE", "http://127.0.0.1:9")  # tests point it at their own server
os.environ.setdefault("BAOMING_RATE_LIMIT", "1000")
os.environ.setdefault("BAOMING_TIMEOUT", "2")
os.environ.setdefault("DJANGO_LANGUAGE_CODE", "zh-hans")
os.environ.setdefault("LEASE_PROVIDER_TIMEOUT", "2")
os.environ.setdefault("LEASE_PROVIDER_RATE_LIMIT", "1000")
# Inline transfers by default: threads would not see a test's uncommitted rows. Tests of the
# threaded path use transaction=True and set it themselves.
os.environ.setdefault("LEASE_TRANSFER_CONCURRENCY", "1")
os.environ["NOTIFY_URLS"] = ""

from leasesite.settings import *  # noqa: E402, F403
from leasesite.settings import DATABASES  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory, so a real worker process can open the same test database.
    DATABASES["default"]["TEST"] = {"NAME": str(_VAR / "test_db.sqlite3")}
