"""Fault family 8: key rotation across every encrypted column with real workers running, and no
plaintext secret anywhere a real deployment writes (database, worker/beat/web logs, access logs,
Redis, admin and error pages).

Real processes throughout: Celery workers and beat as subprocesses on this test's Redis, a gunicorn
web process (DEBUG off, access log on), ``manage.py rotate_token_keys`` as a subprocess, the
bundled fake 报名工具 server and fake team providers as real local HTTP servers.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from leases.models import LeaseStatus, MemberLease, RedemptionCode, Team
from leasesite.crypto import mask_secret
from leasesite.fakes.baoming_server import FakeBaomingServer, fake_qr_scan
from leasesite.fakes.team_provider_server import FakeProviderServer
from leasesite.keys import ciphertext_chunks, encrypted_columns
from tests.faults import _h6_support as h6
from tests.faults.processes import celery_beat, celery_worker, stop
from tokens.models import BaomingToken, QrLogin, QrLoginStatus, RefreshRun, RunKind, RunStatus

pytestmark = pytest.mark.django_db(transaction=True)

BASE = Path(__file__).resolve().parents[2]


def _finished_run(after_id: int) -> RefreshRun | None:
    run = RefreshRun.objects.filter(kind=RunKind.REFRESH, pk__gt=after_id).order_by("pk").first()
    return run if run is not None and run.is_final else None


def _last_run_id() -> int:
    return RefreshRun.objects.order_by("-pk").values_list("pk", flat=True).first() or 0


def _due_lease(team: Team, email: str) -> MemberLease:
    now = timezone.now()
    return MemberLease.objects.create(
        team=team,
        pool=team.pool,
        email=email,
        term_months=1,
        status=LeaseStatus.ACTIVE,
        invited_at=now - timedelta(days=40),
        joined_at=now - timedelta(days=40),
        expires_at=now - timedelta(minutes=1),
    )


def _raw_ciphertexts() -> dict[str, list[tuple[object, str]]]:
    """Every non-empty ciphertext of every encrypted column, by column label."""
    found: dict[str, list[tuple[object, str]]] = {}
    for column in encrypted_columns():
        for rows in ciphertext_chunks(column, chunk_size=500):
            found.setdefault(column.label, []).extend((pk, text) for pk, text, *_ in rows if text)
    return found


def _opens(key: str, ciphertext: str) -> str | None:
    try:
        return Fernet(key.encode()).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        return None


# -- rotation under running workers ------------------------------------------------------------------
def test_rotation_with_workers_running_then_the_old_key_dropped(live_server_env, tmp_path, settings):
    old_key = settings.TOKEN_ENCRYPTION_KEYS[0]
    new_key = Fernet.generate_key().decode()
    alpha_token, beta_token = f"tp_{secrets.token_urlsafe(24)}", f"tp_{secrets.token_urlsafe(24)}"
    with (
        FakeBaomingServer() as upstream,
        FakeProviderServer(token=alpha_token) as alpha_server,
        FakeProviderServer(token=beta_token) as beta_server,
    ):
        for n in range(7):
            BaomingToken.objects.create(card_name=f"名片{n}", token=secrets.token_hex(16))
        plaintexts = {t.pk: t.token for t in BaomingToken.objects.all()}
        qr_code = secrets.token_urlsafe(18)
        qr = QrLogin.objects.create(card_name="扫码", code=qr_code, expires_at=timezone.now() + timedelta(minutes=3))
        alpha = Team.objects.create(
            name="alpha", provider="http", api_base=alpha_server.team_url("alpha"), api_token=alpha_token, capacity=10
        )
        beta = Team.objects.create(
            name="beta", provider="http", api_base=beta_server.team_url("beta"), api_token=beta_token, capacity=10
        )
        due = _due_lease(alpha, "due@example.com")
        alpha_server.state.team("alpha").add_member(due.email)
        h6.recount_seats()
        before = _raw_ciphertexts()
        assert {label: len(rows) for label, rows in before.items()} == {
            "tokens.BaomingToken.token": 7,
            "tokens.QrLogin.code": 1,
            "leases.Team.api_token": 2,
        }

        env = {**live_server_env, "BAOMING_API_BASE": upstream.url, "BAOMING_BATCH_SIZE": "2"}
        both = {**env, "TOKEN_ENCRYPTION_KEYS": f"{new_key},{old_key}"}
        logs = [tmp_path / f"worker-{n}.log" for n in range(4)]
        # Step 1 of README's procedure: every process gets the new key first, the old one behind it.
        workers = [celery_worker(both, logs[n], name=f"h6rot{n}") for n in range(2)]
        try:
            settings.TOKEN_ENCRYPTION_KEYS = [new_key, old_key]
            from tokens.tasks import refresh_tokens

            first = _last_run_id()
            refresh_tokens.delay(max_age_days=None)  # a refresh run racing the rotation
            rotation = subprocess.run(
                [sys.executable, "manage.py", "rotate_token_keys", "--chunk-size", "2"],
                cwd=BASE,
                env=both,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert rotation.returncode == 0, rotation.stderr
            assert "Traceback" not in rotation.stderr
            for label in ("tokens.BaomingToken.token", "tokens.QrLogin.code", "leases.Team.api_token"):
                assert f"{label}: re-encrypted " in rotation.stdout, rotation.stdout
            run = h6.wait_until(lambda: _finished_run(first), timeout=90, what="the refresh run during rotation")
            assert (run.status, run.total, run.ok, run.deleted) == (RunStatus.SUCCEEDED, 7, 7, 0)
        finally:
            for worker in workers:
                stop(worker)

        # Every ciphertext of every column opens with the new key alone and no longer with the old.
        after = _raw_ciphertexts()
        assert {label: len(rows) for label, rows in after.items()} == {label: len(r) for label, r in before.items()}
        for label, rows in after.items():
            for pk, ciphertext in rows:
                assert _opens(new_key, ciphertext) is not None, f"{label} id {pk} not under the new key"
                assert _opens(old_key, ciphertext) is None, f"{label} id {pk} still under the old key"

        # Step 3: the old key is dropped everywhere; workers restart with the new key only.
        settings.TOKEN_ENCRYPTION_KEYS = [new_key]
        assert {t.pk: t.token for t in BaomingToken.objects.all()} == plaintexts
        assert QrLogin.objects.get(pk=qr.pk).code == qr_code
        assert dict(Team.objects.values_list("name", "api_token")) == {"alpha": alpha_token, "beta": beta_token}
        check = subprocess.run(
            [sys.executable, "manage.py", "check"],
            cwd=BASE,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "TOKEN_ENCRYPTION_KEYS": new_key},
        )
        assert check.returncode == 0, check.stdout + check.stderr  # leasesite.E002: nothing undecryptable

        only_new = {**env, "TOKEN_ENCRYPTION_KEYS": new_key}
        workers = [celery_worker(only_new, logs[2 + n], name=f"h6new{n}") for n in range(2)]
        try:
            from leases.tasks import run_transfers

            upstream_before = len(upstream.state.arrivals)
            second = _last_run_id()
            refresh_tokens.delay(max_age_days=None)
            run_transfers.delay()
            run = h6.wait_until(lambda: _finished_run(second), timeout=90, what="the refresh run after rotation")
            assert (run.status, run.total, run.ok, run.deleted, run.failed) == (RunStatus.SUCCEEDED, 7, 7, 0, 0)
            assert len(upstream.state.arrivals) - upstream_before == 7  # each decrypted token checked once
            h6.wait_until(
                lambda: MemberLease.objects.filter(pk=due.pk, status=LeaseStatus.PENDING, team=beta).exists(),
                timeout=90,
                what="the transfer to beta",
            )
        finally:
            for worker in workers:
                stop(worker)
        # The providers check the bearer token: both calls were made with the decrypted team tokens.
        assert beta_server.state.team("beta").invite_posts == [due.email]
        assert due.email not in alpha_server.state.team("alpha").member_emails()
        assert BaomingToken.objects.count() == 7
        text = "\n".join(log.read_text() for log in logs)
        assert "cannot be decrypted" not in text and "Traceback" not in text, text[-4000:]


# -- no plaintext anywhere -----------------------------------------------------------------------------
def test_scanner_finds_secrets_in_every_form_it_claims():
    """The grep of the next test can fail: a secret planted in each form is found."""
    import base64
    import json
    import zlib
    from urllib.parse import quote

    secret = f"tp_{secrets.token_urlsafe(24)}"
    planted = {
        "plain": f"x {secret} y",
        "url": f"a={quote(secret, safe='')}",
        "hex": f"\\x{secret.encode().hex().upper()}",
        **{f"b64-{n}": base64.b64encode(json.dumps({"pad": "p" * n, "s": secret}).encode()).decode() for n in range(3)},
        "b64url": base64.urlsafe_b64encode(b"\xff\xfe" + secret.encode()).decode(),
        "zlib": base64.urlsafe_b64encode(zlib.compress(json.dumps({"m": secret}).encode() * 3)).decode(),
        "kombu": json.dumps({"body": base64.b64encode(json.dumps([[secret], {}]).encode()).decode()}),
    }
    for name, text in planted.items():
        scanner = h6.SecretScanner({"s": secret})
        scanner.scan(name, text)
        assert scanner.leaks, name
    clean = h6.SecretScanner({"s": secret})
    clean.scan("masked", f"token {mask_secret(secret)} masked")
    assert not clean.leaks


def test_no_plaintext_secret_in_database_logs_redis_or_pages(live_server_env, tmp_path, settings):
    password = f"pw-{secrets.token_urlsafe(12)}"
    metrics_token = f"mt-{secrets.token_urlsafe(20)}"
    alpha_token, beta_token = f"tp_{secrets.token_urlsafe(24)}", f"tp_{secrets.token_urlsafe(24)}"
    qr_token = secrets.token_hex(16)
    with (
        FakeBaomingServer() as upstream,
        FakeProviderServer(token=alpha_token) as alpha_server,
        FakeProviderServer(token=beta_token) as beta_server,
    ):
        tokens = [BaomingToken.objects.create(card_name=f"名片{n}", token=secrets.token_hex(16)) for n in range(6)]
        alpha = Team.objects.create(
            name="alpha", provider="http", api_base=alpha_server.team_url("alpha"), api_token=alpha_token, capacity=10
        )
        beta = Team.objects.create(
            name="beta", provider="http", api_base=beta_server.team_url("beta"), api_token=beta_token, capacity=10
        )
        joining = MemberLease.objects.create(
            team=alpha,
            pool="default",
            email="joining@example.com",
            term_months=1,
            status=LeaseStatus.PENDING,
            invited_at=timezone.now(),
        )
        alpha_server.state.team("alpha").add_member(joining.email)
        due = _due_lease(alpha, "due@example.com")
        alpha_server.state.team("alpha").add_member(due.email)
        h6.recount_seats()
        h6.clear_attempt_windows()
        code = RedemptionCode.objects.create(code=f"H6-{secrets.token_hex(4).upper()}-CODE", term_months=1)
        # The web process uses the production hashers (the tests' settings use a fast MD5 one).
        from django.contrib.auth.hashers import PBKDF2PasswordHasher

        user = get_user_model().objects.create_superuser("ops", "ops@example.com", None)
        user.password = PBKDF2PasswordHasher().encode(password, PBKDF2PasswordHasher().salt(), iterations=1000)
        user.save(update_fields=["password"])

        env = {
            **live_server_env,
            "BAOMING_API_BASE": upstream.url,
            "LOG_LEVEL": "DEBUG",
            "METRICS_TOKEN": metrics_token,
            "BAOMING_BATCH_SIZE": "2",
        }
        worker_logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
        beat_log = tmp_path / "beat.log"
        procs = [
            celery_worker(env, worker_logs[n], name=f"h6leak{n}", extra_args=("--loglevel=DEBUG",)) for n in range(2)
        ]
        procs.append(celery_beat(env, beat_log, extra_args=("--loglevel=DEBUG",)))
        web = h6.start_gunicorn(env, tmp_path)
        pages: dict[str, requests.Response] = {}
        try:
            from leases.tasks import run_transfers, sync_joins
            from tokens.tasks import refresh_tokens

            first = _last_run_id()
            refresh_tokens.delay(max_age_days=None)
            sync_joins.delay()
            run_transfers.delay()

            customer = requests.Session()
            redeemed = h6.csrf_post(
                customer, f"{web.url}/redeem/", {"code": code.code.lower(), "email": "new@example.com"}
            )
            assert redeemed.status_code == 200 and "/redeem/lease/" in redeemed.url, redeemed.text[:2000]
            pages["status page"] = redeemed
            pages["lookup"] = h6.csrf_post(
                customer, f"{web.url}/redeem/status/", {"code": code.code, "email": "new@example.com"}
            )
            pages["used code"] = h6.csrf_post(
                customer, f"{web.url}/redeem/", {"code": code.code, "email": "x@example.com"}
            )
            assert pages["used code"].status_code == 400

            admin = requests.Session()
            h6.admin_login(admin, web.url, "ops", password)
            started = h6.csrf_post(admin, f"{web.url}/admin/tokens/baomingtoken/scan/", {"card_name": "扫码名片"})
            assert started.ok and "/scan/" in started.url, started.text[:2000]
            login = h6.wait_until(
                lambda: QrLogin.objects.filter(status=QrLoginStatus.WAITING).first(),
                timeout=60,
                what="the QR login to wait for its scan",
            )
            pages["scan page"] = admin.get(started.url, timeout=30)
            pages["scan status"] = admin.get(f"{started.url.rstrip('/')}/status/", timeout=30)
            fake_qr_scan(base_url=upstream.url, code=login.code, details={"access_token": qr_token, "uname": "扫码人"})
            h6.wait_until(
                lambda: QrLogin.objects.filter(pk=login.pk, status=QrLoginStatus.SUCCEEDED).exists(),
                timeout=60,
                what="the QR login to succeed",
            )
            pages["scan done"] = admin.get(started.url, timeout=30)

            run = h6.wait_until(lambda: _finished_run(first), timeout=90, what="the refresh run")
            assert (run.status, run.ok) == (RunStatus.SUCCEEDED, 6)
            h6.wait_until(
                lambda: MemberLease.objects.filter(pk=joining.pk, status=LeaseStatus.ACTIVE).exists(),
                timeout=60,
                what="the join sync",
            )
            # The first run_transfers raced the join sync sent with it; beat sends it every five
            # minutes, this test every five seconds until the lease has moved.
            sent_at = [time.monotonic()]

            def transferred() -> bool:
                if MemberLease.objects.filter(pk=due.pk, team=beta, status=LeaseStatus.PENDING).exists():
                    return True
                if time.monotonic() - sent_at[0] > 5:
                    sent_at[0] = time.monotonic()
                    run_transfers.delay()
                return False

            h6.wait_until(
                transferred,
                timeout=60,
                what="the transfer",
            )
            h6.wait_until(
                lambda: MemberLease.objects.filter(email="new@example.com", invited_at__isnull=False).exists(),
                timeout=60,
                what="the redeemed lease's invite",
            )

            pages.update(h6.crawl_admin(admin, web.url))
            for name, path in {
                "404": "/no/such/page",
                "bad admin id": "/admin/leases/team/999999/change/",
                "bad admin pk": "/admin/tokens/baomingtoken/not-a-number/change/",
                "bad admin model": "/admin/tokens/nosuchmodel/",
                "bad lease uuid": "/redeem/lease/not-a-uuid/",
                "unknown lease": "/redeem/lease/00000000-0000-0000-0000-000000000000/",
                "healthz": "/healthz",
                "metrics without token": "/metrics",
            }.items():
                pages[name] = admin.get(f"{web.url}{path}", timeout=30)
            pages["metrics"] = requests.get(
                f"{web.url}/metrics", headers={"Authorization": f"Bearer {metrics_token}"}, timeout=30
            )
        finally:
            web.stop()
            for proc in procs:
                stop(proc)
        assert pages["404"].status_code == 404 and pages["metrics"].status_code == 200
        assert pages["metrics without token"].status_code == 401
        assert sum(1 for path in pages if path.endswith("/change/")) >= 8  # the crawl reached the rows

        # Messages left on the broker for nobody (the workers are gone): their bodies are scanned too.
        refresh_tokens.delay(max_age_days=None)
        sync_joins.delay(team_id=alpha.pk)

        secrets_by_name = {f"token {t.pk}": t.token for t in tokens}
        secrets_by_name |= {
            "qr token": qr_token,
            "qr login code": login.code,
            "alpha api token": alpha_token,
            "beta api token": beta_token,
            "metrics token": metrics_token,
            "admin password": password,
            "encryption key": django_settings.TOKEN_ENCRYPTION_KEYS[0],
        }
        assert BaomingToken.objects.filter(user_name="扫码人").get().token == qr_token  # the QR login stored it

        scanner = h6.SecretScanner(secrets_by_name)
        scanner.scan("pg_dump of the test database", h6.pg_dump())
        for log in [*worker_logs, beat_log, *web.logs()]:
            scanner.scan_file(log)
        redis_keys = 0
        for url in (django_settings.REDIS_URL, django_settings.CELERY_BROKER_URL):
            for key, value in h6.redis_dump(url):
                redis_keys += 1
                scanner.scan(f"redis {url} key {key}", value)
        for name, response in pages.items():
            scanner.scan(f"page {name} ({response.url}, {response.status_code})", response.content)

        assert not scanner.leaks, "\n".join(map(str, scanner.leaks[:20]))
        # The scan saw real material: the access log has the requests, the broker the messages,
        # the database the ciphertext, and the pages the masked forms.
        access = web.access_log.read_text()
        assert "POST /redeem/ HTTP/1.1" in access and "GET /metrics HTTP/1.1" in access
        assert redis_keys >= 2
        assert "DEBUG" in worker_logs[0].read_text() + worker_logs[1].read_text()
        token_pages = "".join(r.text for path, r in pages.items() if "/tokens/baomingtoken/" in path)
        assert sum(mask_secret(t.token) in token_pages for t in tokens) >= 3
        team_pages = "".join(r.text for path, r in pages.items() if "/leases/team/" in path)
        assert mask_secret(alpha_token) in team_pages and mask_secret(beta_token) in team_pages
        assert not h6.log_problems([*worker_logs, beat_log, *web.logs()])
