"""Helpers of H6's fault modules (secrets, bad input): a gunicorn web process on the test
database, a crawler of its admin, and a scanner that looks for secrets in every form they could
take (plain, URL-encoded, base64 in any alignment, hex, inside base64/zlib blobs) in database dumps,
log files, Redis and HTML."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus, urljoin

import requests
from django.db import connection

from tests.faults import processes

BASE = Path(__file__).resolve().parents[2]


# -- where a secret could hide --------------------------------------------------------------------
def _b64_fragments(secret: bytes) -> set[str]:
    """The parts of base64(…secret…) that do not depend on what surrounds the secret, for each of
    the three alignments a secret can have inside a longer base64 text (standard and url-safe)."""
    fragments: set[str] = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret).decode()
        # Characters touched by the prefix or by the (unknown) bytes after the secret are dropped.
        start = (shift * 4 + 2) // 3 if shift else 0
        end = (len(b"\0" * shift + secret) // 3) * 4
        middle = encoded[start:end]
        if len(middle) >= 8:
            fragments.add(middle)
            fragments.add(middle.replace("+", "-").replace("/", "_"))
    return fragments


def secret_forms(secret: str) -> set[str]:
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret), raw.hex(), json.dumps(secret)[1:-1]}
    forms |= _b64_fragments(raw)
    return {form for form in forms if form}


_BLOB = re.compile(rb"[A-Za-z0-9+/_\-]{16,}={0,2}")


def _decoded_blobs(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """``data`` and whatever base64 (and zlib inside it) decodes from its long base64-looking runs."""
    yield data
    if depth >= 3:
        return
    for match in _BLOB.finditer(data):
        chunk = match.group(0)
        for decoder in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                decoded = decoder(chunk + b"=" * (-len(chunk) % 4))
            except (binascii.Error, ValueError):
                continue
            yield from _decoded_blobs(decoded, depth + 1)
            with contextlib.suppress(zlib.error):
                yield from _decoded_blobs(zlib.decompress(decoded), depth + 1)


@dataclass
class Leak:
    where: str
    secret_name: str
    form: str
    context: str

    def __str__(self) -> str:
        return f"{self.where}: {self.secret_name} as {self.form!r} in …{self.context}…"


@dataclass
class SecretScanner:
    secrets: dict[str, str]  # a name for the report -> the secret
    leaks: list[Leak] = field(default_factory=list)
    scanned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._forms = {name: {f.encode() for f in secret_forms(value)} for name, value in self.secrets.items()}

    def scan(self, where: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.scanned.append(where)
        for blob in _decoded_blobs(data):
            lowered = blob.lower()
            for name, forms in self._forms.items():
                for form in forms:
                    # hex is case-insensitive (bytea dumps, %XX escapes); the rest is exact
                    at = lowered.find(form.lower()) if _is_hex(form) else blob.find(form)
                    if at >= 0:
                        context = blob[max(0, at - 60) : at + len(form) + 20].decode("utf-8", "replace")
                        self.leaks.append(Leak(where, name, form.decode(), context))
                        break

    def scan_file(self, path: Path) -> None:
        self.scan(str(path), path.read_bytes())


def _is_hex(form: bytes) -> bool:
    return re.fullmatch(rb"[0-9a-fA-F]+", form) is not None


# -- the database, Redis --------------------------------------------------------------------------
def database_url() -> str:
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def pg_dump() -> bytes:
    """Every row of every table of the test database, as ``pg_dump --data-only`` prints them."""
    db = connection.settings_dict
    result = subprocess.run(
        [
            "pg_dump",
            "--data-only",
            "--no-owner",
            "-h",
            db["HOST"] or "127.0.0.1",
            "-p",
            str(db["PORT"] or 5432),
            "-U",
            db["USER"],
            db["NAME"],
        ],
        capture_output=True,
        check=True,
        timeout=60,
        env={"PGPASSWORD": db["PASSWORD"] or "", "PATH": "/usr/bin:/bin"},
    )
    return result.stdout


def redis_dump(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) for every key of the Redis database at ``url``: its value read by type, and
    its DUMP serialisation."""
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        parts: list[bytes] = [key]
        if kind == "string":
            parts.append(client.get(key) or b"")
        elif kind == "hash":
            for k, v in client.hgetall(key).items():
                parts += [k, v]
        elif kind == "list":
            parts += client.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(client.smembers(key))
        elif kind == "zset":
            parts += [member for member, _score in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _id, fields in client.xrange(key):
                for k, v in fields.items():
                    parts += [k, v]
        parts.append(client.dump(key) or b"")
        yield key.decode("utf-8", "replace"), b"\n".join(parts)


# -- a web process ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class WebServer:
    proc: subprocess.Popen
    url: str
    access_log: Path
    error_log: Path
    output_log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def logs(self) -> list[Path]:
        return [self.access_log, self.error_log, self.output_log]


def start_gunicorn(env: dict[str, str], log_dir: Path, *, workers: int = 2, threads: int = 4) -> WebServer:
    """gunicorn serving the site as docker/entrypoint.sh does (DEBUG off, access log on, its default
    format), logging at debug level."""
    port = free_port()
    access, error, output = log_dir / "access.log", log_dir / "gunicorn-error.log", log_dir / "web-output.log"
    env = {
        **env,
        "DJANGO_DEBUG": "false",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_COOKIES": "false",
        "DJANGO_SECURE_SSL_REDIRECT": "false",
    }
    out = open(output, "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "leasesite.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--access-logfile",
            str(access),
            "--error-logfile",
            str(error),
            "--log-level",
            "debug",
            "--capture-output",
            "--timeout",
            "60",
        ],
        cwd=BASE,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    server = WebServer(proc, f"http://127.0.0.1:{port}", access, error, output)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {proc.returncode}: {output.read_text()}{error.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/healthz", timeout=5).status_code in (200, 503):
                return server
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"gunicorn did not answer within 60 s: {error.read_text()}")
        time.sleep(0.2)


def csrf_post(session: requests.Session, url: str, data: dict, **kwargs: object) -> requests.Response:
    """GET the form page for its CSRF cookie, then POST ``data`` with the token."""
    if "csrftoken" not in session.cookies:
        session.get(url, timeout=30)
    return session.post(
        url,
        data={"csrfmiddlewaretoken": session.cookies.get("csrftoken", ""), **data},
        headers={"Referer": url},
        timeout=30,
        **kwargs,
    )


def admin_login(session: requests.Session, base: str, username: str, password: str) -> None:
    response = csrf_post(session, f"{base}/admin/login/?next=/admin/", {"username": username, "password": password})
    assert response.ok and "sessionid" in session.cookies, response.text[:2000]


_ADMIN_LINK = re.compile(r'href="(/admin/[a-z_]+/[a-z_]+/(?:[^"#?]*/change/)?)"')


def crawl_admin(session: requests.Session, base: str, *, per_model: int = 5) -> dict[str, requests.Response]:
    """The admin index, every model's list page, and up to ``per_model`` change pages of each."""
    pages: dict[str, requests.Response] = {}

    def get(path: str) -> requests.Response:
        if path not in pages:
            pages[path] = session.get(urljoin(base, path), timeout=30)
        return pages[path]

    index = get("/admin/")
    lists = sorted({link for link in _ADMIN_LINK.findall(index.text) if not link.endswith("/change/")})
    for listing in lists:
        page = get(listing)
        changes = [link for link in _ADMIN_LINK.findall(page.text) if link.endswith("/change/")]
        for link in list(dict.fromkeys(changes))[:per_model]:
            get(link)
    return pages


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.2) -> object:
    return processes.wait_for(predicate, timeout=timeout, what=what, interval=interval)


def log_problems(paths: Iterable[Path]) -> list[str]:
    """Lines of these logs that show a crash (tracebacks, unhandled errors)."""
    problems = []
    for path in paths:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if "Traceback" in line or "Internal Server Error" in line:
                problems.append(f"{path.name}:{number}: {line}")
    return problems


def recount_seats() -> None:
    """Leases written directly by a set-up bypass the transition function: recount the teams'
    seat counters (``Team.seats_taken``, when this version of the engine keeps one)."""
    try:
        from leases.services.transitions import teams_seats_recount
    except ImportError:
        return
    teams_seats_recount()


def clear_attempt_windows() -> None:
    """Forget the public forms' per-address attempt counts (``leasesite:attempts:*`` in this test's
    Redis): every test's web requests come from 127.0.0.1."""
    from leasesite.redis_client import get_redis

    client = get_redis()
    for key in client.scan_iter(match="leasesite:attempts:*", count=1000):
        client.delete(key)
