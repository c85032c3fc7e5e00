"""Reminder mails (task ``leases.send_reminders``), sent through a real local SMTP server."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease
from leases.services import reminders
from leases.services.reminders import FAILING_ALERT_KEY, mask_email, reminders_send
from leasesite.schedules import DEFAULT_SCHEDULES
from tests.lease_fixtures import TEAM_TOKEN
from tests.test_settings_env import run_check

pytestmark = pytest.mark.django_db

BASE = Path(__file__).resolve().parent.parent.parent
PUBLIC = "https://seats.example.com"
DAY = timedelta(days=1)


# -- a real SMTP server ------------------------------------------------------------------------------
@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]

    def part(self, content_type: str) -> str:
        body = self.message.get_body(preferencelist=(content_type.split("/")[1],))
        assert body is not None and body.get_content_type() == content_type
        return body.get_content()


@dataclass
class SmtpSink:
    """A small SMTP server (HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) on a free local port.
    It keeps what it accepts, refuses the recipients in ``refuse_rcpt`` (550 at RCPT) and fails
    the mails to ``fail_data`` after their DATA (451)."""

    messages: list[Received] = field(default_factory=list)
    refuse_rcpt: set[str] = field(default_factory=set)
    fail_data: set[str] = field(default_factory=set)
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, text: str) -> None:
                self.wfile.write(text.encode() + b"\r\n")
                self.wfile.flush()

            def handle(self) -> None:
                with sink.lock:
                    sink.connections += 1
                self.reply("220 sink.test ESMTP ready")
                mail_from, rcpts = "", []
                while raw := self.rfile.readline(65536):
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    verb = line.split(" ", 1)[0].upper()
                    bracketed = re.search(r"<([^>]*)>", line)
                    address = bracketed.group(1) if bracketed else ""
                    if verb == "EHLO":
                        self.reply("250-sink.test\r\n250-8BITMIME\r\n250 HELP")
                    elif verb in ("HELO", "NOOP"):
                        self.reply("250 ok")
                    elif verb == "RSET":
                        mail_from, rcpts = "", []
                        self.reply("250 ok")
                    elif verb == "MAIL":
                        mail_from, rcpts = address, []
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        if address.lower() in sink.refuse_rcpt:
                            self.reply(f"550 5.1.1 <{address}>: mailbox unavailable")
                        else:
                            rcpts.append(address)
                            self.reply("250 ok")
                    elif verb == "DATA":
                        if not rcpts:
                            self.reply("503 5.5.1 no valid recipients")
                            continue
                        self.reply("354 end data with <CR><LF>.<CR><LF>")
                        lines = []
                        while (chunk := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                            lines.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                        if any(rcpt.lower() in sink.fail_data for rcpt in rcpts):
                            self.reply("451 4.3.0 try again later")
                        else:
                            with sink.lock:
                                sink.messages.append(Received(mail_from, rcpts, b"".join(lines)))
                            self.reply("250 2.0.0 queued")
                        mail_from, rcpts = "", []
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 5.5.2 command not implemented")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def to(self, email: str) -> list[Received]:
        return [m for m in self.messages if email in m.rcpts]


@pytest.fixture
def smtp(settings):
    sink = SmtpSink()
    sink.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = sink.port
    settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    settings.DEFAULT_FROM_EMAIL = "leasesite <noreply@seats.example.com>"
    settings.LEASE_PUBLIC_BASE_URL = PUBLIC
    settings.LEASE_REMINDER_DAYS = [7, 3, 1]
    settings.LEASE_ACCEPT_REMINDER_DAYS = 3
    settings.LEASE_REMINDER_FAILURE_ALERT = 5
    yield sink
    sink.stop()


def reminded(lease: MemberLease) -> list[dict]:
    return [
        e.detail
        for e in LeaseEvent.objects.filter(lease=lease, action=LeaseAction.REMINDED).order_by("created_at", "id")
    ]


def local(moment: datetime) -> str:
    return timezone.localtime(moment, ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d %H:%M")


# -- "your seat ends" --------------------------------------------------------------------------------
def test_each_threshold_is_mailed_once(smtp, make_team, make_lease):
    start = timezone.now()
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=start + 10 * DAY)

    assert reminders_send(now=start).sent == 0  # 10 days left: nothing yet
    for days_before, threshold in ((6.5, 7), (2.5, 3), (0.5, 1)):
        now = lease.ends_at - timedelta(days=days_before)
        assert reminders_send(now=now).summary() == {"sent": 1, "failed": 0, "skipped": 0, "unrecorded": 0, "busy": 0}
        second = reminders_send(now=now)
        assert (second.sent, second.skipped) == (0, 1)  # the same day again: nothing new
        assert reminded(lease)[-1] == {
            "kind": "ends",
            "days": threshold,
            "ends_at": lease.ends_at.isoformat(),
            "to": lease.email,
        }
    assert reminders_send(now=lease.ends_at + timedelta(hours=1)).sent == 0  # over: not a reminder's business
    assert [d["days"] for d in reminded(lease)] == [7, 3, 1]
    assert len(smtp.to(lease.email)) == 3
    assert all(m.mail_from == "noreply@seats.example.com" for m in smtp.messages)


def test_thresholds_due_together_send_one_mail_and_never_a_late_one(smtp, make_team, make_lease):
    """First seen 2 days before its end: the 3-day mail only; the 7-day one is never sent after it."""
    now = timezone.now()
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)

    assert reminders_send(now=now).sent == 1
    assert [d["days"] for d in reminded(lease)] == [3]
    assert reminders_send(now=now + timedelta(hours=3)).sent == 0
    assert reminders_send(now=now + 1.5 * DAY).sent == 1  # half a day left: the 1-day mail
    assert [d["days"] for d in reminded(lease)] == [3, 1]
    assert reminders_send(now=now + 1.9 * DAY).sent == 0
    assert len(smtp.to(lease.email)) == 2


def test_a_renewal_gets_fresh_reminders(smtp, make_team, make_lease):
    now = timezone.now()
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=now + 5 * DAY)
    assert reminders_send(now=now).sent == 1  # the 7-day mail

    renewed_until = lease.ends_at + 30 * DAY
    MemberLease.objects.filter(pk=lease.pk).update(ends_at=renewed_until)  # what a renewal does to it

    assert reminders_send(now=now + DAY).sent == 0  # 34 days left
    assert reminders_send(now=renewed_until - 6 * DAY).sent == 1
    assert reminders_send(now=renewed_until - 6 * DAY).sent == 0
    assert [(d["days"], d["ends_at"]) for d in reminded(lease)] == [
        (7, lease.ends_at.isoformat()),
        (7, renewed_until.isoformat()),
    ]


def test_leases_without_a_seat_to_lose_get_nothing(smtp, make_team, make_lease):
    now = timezone.now()
    team = make_team("alpha")
    others = [
        make_lease(None, LeaseStatus.WAITING, ends_at=now + 2 * DAY),
        make_lease(team, LeaseStatus.CANCELLED, ends_at=now + 2 * DAY, invited_at=now - 10 * DAY),
        make_lease(team, LeaseStatus.EXPIRED, ends_at=now + 2 * DAY, invited_at=now - 10 * DAY),
        make_lease(team, LeaseStatus.ACTIVE, ends_at=None),  # rotates until cancelled
        make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 8 * DAY),  # not yet
    ]
    seated = [
        make_lease(team, status, ends_at=now + 2 * DAY)
        for status in (LeaseStatus.TRANSFERRING, LeaseStatus.FAILED, LeaseStatus.ACTIVE)
    ]

    run = reminders_send(now=now)

    assert run.sent == len(seated)
    assert sorted(rcpt for m in smtp.messages for rcpt in m.rcpts) == sorted(lease.email for lease in seated)
    assert not any(reminded(lease) for lease in others)


# -- "accept your invitation" -----------------------------------------------------------------------
def test_an_invitation_not_accepted_is_reminded_once_per_invitation(smtp, make_team, make_lease):
    now = timezone.now()
    team = make_team("alpha")
    old = make_lease(team, LeaseStatus.PENDING, invited_at=now - 4 * DAY)
    fresh = make_lease(team, LeaseStatus.PENDING, invited_at=now - 2 * DAY)
    joined = make_lease(team, LeaseStatus.ACTIVE, invited_at=now - 10 * DAY)

    assert reminders_send(now=now).sent == 1
    assert reminders_send(now=now).sent == 0
    assert reminded(old) == [{"kind": "accept", "to": old.email}]
    assert not reminded(fresh) and not reminded(joined)

    # A new invitation (the join sync invites again): one more reminder once it is 3 days old.
    MemberLease.objects.filter(pk=old.pk).update(invited_at=timezone.now())
    assert reminders_send(now=now + DAY).sent == 1  # ``fresh`` turned 3 days old
    assert reminders_send(now=timezone.now() + 3.5 * DAY).sent == 1  # ``old``'s new invitation
    assert [d["kind"] for d in reminded(old)] == ["accept", "accept"]
    assert len(smtp.to(old.email)) == 2 and len(smtp.to(fresh.email)) == 1


def test_the_accept_mail_says_where_and_since_when(smtp, make_team, make_lease):
    now = timezone.now()
    lease = make_lease(make_team("Team <Blue> & Co"), LeaseStatus.PENDING, invited_at=now - 4 * DAY)

    reminders_send(now=now)

    (mail,) = smtp.to(lease.email)
    text, html = mail.part("text/plain"), mail.part("text/html")
    status_url = f"{PUBLIC}/redeem/lease/{lease.public_id}/"
    assert mail.message["Subject"].strip()
    assert "Team <Blue> & Co" in text and "Team &lt;Blue&gt; &amp; Co" in html and "<Blue>" not in html
    assert local(lease.invited_at) in text and local(lease.invited_at) in html
    assert status_url in text and f'href="{status_url}"' in html


# -- the mail itself ---------------------------------------------------------------------------------
def midday() -> datetime:
    """Noon local time today. "In N days" counts calendar days in DJANGO_TIME_ZONE, so a test run
    shortly before local midnight would otherwise cross a day boundary with its "+ 1 hour"."""
    return timezone.localtime().replace(hour=12, minute=0, second=0, microsecond=0)


def test_the_mail_has_text_and_html_with_absolute_links_and_local_dates(smtp, make_team, make_lease):
    now = midday()
    team = make_team("Team Ω & Co")
    lease = make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY + timedelta(hours=1))

    reminders_send(now=now)

    (mail,) = smtp.to(lease.email)
    message = mail.message
    assert message.get_content_type() == "multipart/alternative"
    assert message["To"] == lease.email and message["Auto-Submitted"] == "auto-generated"
    assert message["Subject"].strip()
    text, html = mail.part("text/plain"), mail.part("text/html")
    status_url = f"{PUBLIC}/redeem/lease/{lease.public_id}/"
    for body in (text, html):
        assert status_url in body
        assert f"{PUBLIC}/redeem/" in body  # renew: another code, same email
        assert lease.email in body
        assert local(lease.ends_at) in body and "Asia/Shanghai" in body
    assert f'href="{status_url}"' in html and f'href="{PUBLIC}/redeem/"' in html
    assert "Team Ω & Co" in text and "Team Ω &amp; Co" in html
    assert '<html lang="zh-hans">' in html  # the site's language (DJANGO_LANGUAGE_CODE)
    raw = mail.data.decode("utf-8", "replace")
    for secret in (TEAM_TOKEN, team.api_base):
        assert secret not in raw


def test_a_failed_lease_mail_names_no_team(smtp, make_team, make_lease):
    now = timezone.now()
    lease = make_lease(make_team("alpha-team"), LeaseStatus.FAILED, ends_at=now + DAY, last_error="HTTP 500 secret")

    reminders_send(now=now)

    (mail,) = smtp.to(lease.email)
    assert "alpha-team" not in mail.data.decode() and "HTTP 500" not in mail.data.decode()


def test_the_mail_follows_the_site_language(smtp, settings, make_team, make_lease):
    settings.LANGUAGE_CODE = "en"
    now = midday()
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=now + 2 * DAY + timedelta(hours=1))

    reminders_send(now=now)

    (mail,) = smtp.to(lease.email)
    assert mail.message["Subject"] == "Your seat ends in 2 days"
    text = mail.part("text/plain")
    assert "Your seat in team alpha ends on" in text and "That is in 2 days." in text
    assert "redeem another code" in text


# -- failures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["refused recipient", "failed data"])
def test_a_failed_mail_is_not_recorded_and_is_retried_while_the_others_go_out(smtp, make_team, make_lease, caplog, how):
    now = timezone.now()
    team = make_team("alpha")
    leases = [make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY) for _ in range(3)]
    unlucky = leases[1]
    (smtp.refuse_rcpt if how == "refused recipient" else smtp.fail_data).add(unlucky.email)

    with caplog.at_level(logging.WARNING, logger="leases.services.reminders"):
        run = reminders_send(now=now)

    assert (run.sent, run.failed) == (2, 1)
    assert not reminded(unlucky) and all(reminded(lease) for lease in leases if lease != unlucky)
    assert {rcpt for m in smtp.messages for rcpt in m.rcpts} == {leases[0].email, leases[2].email}
    assert mask_email(unlucky.email) in caplog.text and unlucky.email not in caplog.text

    smtp.refuse_rcpt.clear()
    smtp.fail_data.clear()
    retry = reminders_send(now=now)

    assert (retry.sent, retry.failed, retry.skipped) == (1, 0, 2)
    assert len(smtp.to(unlucky.email)) == 1 and len(reminded(unlucky)) == 1


def test_one_connection_serves_the_whole_run(smtp, make_team, make_lease):
    now = timezone.now()
    team = make_team("alpha")
    for _ in range(4):
        make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)

    assert reminders_send(now=now).sent == 4
    assert smtp.connections == 1


def test_many_failures_alert_once(smtp, settings, make_team, make_lease, caplog):
    now = timezone.now()
    team = make_team("alpha")
    leases = [make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY) for _ in range(6)]
    smtp.refuse_rcpt.update(lease.email for lease in leases)

    with caplog.at_level(logging.INFO, logger="leasesite.alerts"):
        first = reminders_send(now=now)
        second = reminders_send(now=now)

    assert (first.failed, second.failed) == (6, 6)
    alerts = [r for r in caplog.records if r.name == "leasesite.alerts" and r.levelno >= logging.WARNING]
    assert len(alerts) == 1
    text = alerts[0].getMessage()
    assert "6" in text and not any(lease.email in text or mask_email(lease.email) in text for lease in leases)
    assert any(FAILING_ALERT_KEY in r.getMessage() and "suppressed" in r.getMessage() for r in caplog.records)
    assert not LeaseEvent.objects.filter(action=LeaseAction.REMINDED).exists()


def test_few_failures_do_not_alert(smtp, make_team, make_lease, caplog):
    now = timezone.now()
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)
    smtp.refuse_rcpt.add(lease.email)

    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        assert reminders_send(now=now).failed == 1

    assert not [r for r in caplog.records if r.name == "leasesite.alerts"]


def test_an_unreachable_mail_server_fails_fast_and_alerts(smtp, settings, make_team, make_lease, caplog):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        settings.EMAIL_PORT = probe.getsockname()[1]
    now = timezone.now()
    team = make_team("alpha")
    for _ in range(2):
        make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)

    with caplog.at_level(logging.WARNING):
        run = reminders_send(now=now)

    assert (run.sent, run.failed) == (0, 2)
    assert not LeaseEvent.objects.filter(action=LeaseAction.REMINDED).exists()
    assert "cannot be reached" in caplog.text
    assert [r for r in caplog.records if r.name == "leasesite.alerts"]


def test_a_lease_that_changed_meanwhile_is_logged_and_the_run_goes_on(smtp, make_team, make_lease, monkeypatch):
    now = timezone.now()
    team = make_team("alpha")
    first, second = (make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY) for _ in range(2))
    real_send = reminders._Mailer.send

    def send_then_cancel(self, message, *, lease_id):
        sent = real_send(self, message, lease_id=lease_id)
        if lease_id == first.pk:  # an operator cancels it while its mail goes out
            MemberLease.objects.filter(pk=lease_id).update(status=LeaseStatus.CANCELLED)
        return sent

    monkeypatch.setattr(reminders._Mailer, "send", send_then_cancel)
    run = reminders_send(now=now)

    assert (run.sent, run.unrecorded, run.failed) == (2, 1, 0)
    assert not reminded(first) and reminded(second)


def test_a_second_run_at_the_same_time_does_nothing(smtp, make_team, make_lease):
    from leasesite.locks import lock_acquire, lock_release

    now = timezone.now()
    make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)
    assert lock_acquire(name=reminders.LOCK_NAME, owner="the-other-run", ttl_seconds=60)

    assert reminders_send(now=now).summary()["busy"] == 1
    assert not smtp.messages
    lock_release(name=reminders.LOCK_NAME, owner="the-other-run")
    assert reminders_send(now=now).sent == 1


# -- cost --------------------------------------------------------------------------------------------
# Reading is a constant number of queries per chunk of leases (the leases with their team, their
# reminded events); each mail sent adds its event's write (one lease_step: lock, update, insert).
READ_QUERIES = 12
QUERIES_PER_MAIL = 5


@pytest.mark.parametrize("count", [3, 30])
def test_queries_do_not_grow_with_the_leases_but_with_the_mails(
    smtp, make_team, make_lease, django_assert_max_num_queries, count
):
    now = timezone.now()
    teams = [make_team(f"team-{n}") for n in range(3)]
    for n in range(count):
        make_lease(teams[n % 3], LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)

    with django_assert_max_num_queries(READ_QUERIES + QUERIES_PER_MAIL * count):
        assert reminders_send(now=now).sent == count
    with CaptureQueriesContext(connection) as idle:
        assert reminders_send(now=now).skipped == count
    assert len(idle) <= READ_QUERIES


def test_an_idle_run_costs_the_same_for_3_or_30_leases(smtp, make_team, make_lease):
    now = timezone.now()
    team = make_team("alpha", capacity=100)
    for _ in range(3):
        make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)
    reminders_send(now=now)
    with CaptureQueriesContext(connection) as three:
        reminders_send(now=now)
    for _ in range(27):
        make_lease(team, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY)
    reminders_send(now=now)
    with CaptureQueriesContext(connection) as thirty:
        assert reminders_send(now=now).skipped == 30
    assert len(thirty) == len(three)


# -- task and schedule -------------------------------------------------------------------------------
def test_the_task_is_a_thin_shell(smtp, make_team, make_lease):
    from leases.tasks import send_reminders

    make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=timezone.now() + 2 * DAY)

    assert send_reminders.name == "leases.send_reminders"
    assert send_reminders.apply().get() == {"sent": 1, "failed": 0, "skipped": 0, "unrecorded": 0, "busy": 0}
    assert send_reminders.apply().get()["sent"] == 0


def test_customer_reminders_are_scheduled_daily_at_ten(settings):
    (item,) = [s for s in DEFAULT_SCHEDULES if s.key == "leases: customer reminders"]
    task = PeriodicTask.objects.select_related("crontab").get(name=item.name)
    assert task.task == "leases.send_reminders" and json.loads(task.kwargs) == {}
    cron = task.crontab
    assert (cron.minute, cron.hour, cron.day_of_week, str(cron.timezone)) == ("0", "10", "*", settings.TIME_ZONE)


# -- configuration -----------------------------------------------------------------------------------
def settings_of(env: dict[str, str], *names: str) -> dict:
    """The named settings as a fresh process computes them from ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TOKEN_", "EMAIL_", "LEASE_"))}
    clean.update({"DJANGO_SETTINGS_MODULE": "leasesite.settings", "LEASESITE_VAR_DIR": "/tmp/leasesite-check", **env})
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n, None) for n in {list(names)!r}}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE, env=clean, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


EMAIL_NAMES = (
    "EMAIL_BACKEND",
    "EMAIL_HOST",
    "EMAIL_PORT",
    "EMAIL_HOST_USER",
    "EMAIL_HOST_PASSWORD",
    "EMAIL_USE_TLS",
    "EMAIL_USE_SSL",
    "EMAIL_TIMEOUT",
    "DEFAULT_FROM_EMAIL",
    "LEASE_REMINDER_DAYS",
    "LEASE_ACCEPT_REMINDER_DAYS",
    "LEASE_REMINDER_FAILURE_ALERT",
    "LEASE_PUBLIC_BASE_URL",
)


def test_mail_defaults():
    values = settings_of({}, *EMAIL_NAMES)
    assert values["EMAIL_BACKEND"] == "django.core.mail.backends.console.EmailBackend"
    assert values["DEFAULT_FROM_EMAIL"] == "leasesite <noreply@localhost>"
    assert values["LEASE_REMINDER_DAYS"] == [7, 3, 1]
    assert (values["LEASE_ACCEPT_REMINDER_DAYS"], values["LEASE_REMINDER_FAILURE_ALERT"]) == (3, 5)
    assert values["LEASE_PUBLIC_BASE_URL"] == "http://127.0.0.1:8000"
    assert values["EMAIL_TIMEOUT"] == 10


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mailer:p%40ss%2Fw0rd@mail.example.com:2525", ("mail.example.com", 2525, "mailer", "p@ss/w0rd", 0, 0)),
        ("smtp+tls://mailer:pw@mail.example.com", ("mail.example.com", 587, "mailer", "pw", 1, 0)),
        ("smtp+ssl://mail.example.com", ("mail.example.com", 465, "", "", 0, 1)),
        ("SMTP://127.0.0.1:1025", ("127.0.0.1", 1025, "", "", 0, 0)),
    ],
)
def test_email_url(url, expected):
    values = settings_of(
        {
            "EMAIL_URL": url,
            "DEFAULT_FROM_EMAIL": "Seats <seats@example.com>",
            "LEASE_REMINDER_DAYS": " 1, 14,3,3 ",
            "LEASE_PUBLIC_BASE_URL": "https://seats.example.com/",
        },
        *EMAIL_NAMES,
    )
    assert values["EMAIL_BACKEND"] == "django.core.mail.backends.smtp.EmailBackend"
    host, port, user, password, tls, ssl = expected
    assert (values["EMAIL_HOST"], values["EMAIL_PORT"], values["EMAIL_HOST_USER"]) == (host, port, user)
    assert values["EMAIL_HOST_PASSWORD"] == password
    assert (values["EMAIL_USE_TLS"], values["EMAIL_USE_SSL"]) == (bool(tls), bool(ssl))
    assert values["DEFAULT_FROM_EMAIL"] == "Seats <seats@example.com>"
    assert values["LEASE_REMINDER_DAYS"] == [14, 3, 1]
    assert values["LEASE_PUBLIC_BASE_URL"] == "https://seats.example.com"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://mailer:Pw0rdS3cr3tX@mail.example.com", "scheme 'http' is not supported"),
        ("mailer:Pw0rdS3cr3tX@mail.example.com", "it has no scheme"),
        ("smtp://mailer:Pw0rd/S3cr3tX@mail.example.com:25", "host or port is malformed"),
        ("smtp://mailer:Pw0rd#S3cr3tX@mail.example.com", "host or port is malformed"),
        ("smtp://mailer:Pw0rd?S3cr3tX@mail.example.com", "host or port is malformed"),
        ("smtp://mailer:Pw0rdS3cr3tX@mail.example.com:70000", "host or port is malformed"),
        ("smtp://mailer:Pw0rdS3cr3tX@mail.example.com/x", "must not have a path"),
        ("smtp://mailer:Pw0rdS3cr3tX@:25", "names no host"),
        ("smtp://:Pw0rdS3cr3tX@mail.example.com", "password but no user name"),
    ],
)
def test_a_bad_email_url_stops_the_process_without_showing_the_password(url, says):
    result = run_check({"EMAIL_URL": url})
    assert result.returncode != 0
    assert "EMAIL_URL must look like smtp://user:password@host:port" in result.stderr
    assert says in result.stderr
    output = result.stdout + result.stderr
    assert "Pw0rd" not in output and "S3cr3tX" not in output


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"LEASE_REMINDER_DAYS": "7,0"}, "LEASE_REMINDER_DAYS must be"),
        ({"LEASE_REMINDER_DAYS": "seven"}, "LEASE_REMINDER_DAYS must be"),
        ({"LEASE_REMINDER_DAYS": "400"}, "LEASE_REMINDER_DAYS must be"),
        ({"LEASE_REMINDER_DAYS": ",".join(map(str, range(1, 12)))}, "LEASE_REMINDER_DAYS must be"),
        ({"LEASE_ACCEPT_REMINDER_DAYS": "-1"}, "LEASE_ACCEPT_REMINDER_DAYS must be >= 0"),
        ({"LEASE_REMINDER_FAILURE_ALERT": "0"}, "LEASE_REMINDER_FAILURE_ALERT must be >= 1"),
        ({"LEASE_PUBLIC_BASE_URL": "seats.example.com"}, "LEASE_PUBLIC_BASE_URL must be"),
        ({"DEFAULT_FROM_EMAIL": "nobody"}, "DEFAULT_FROM_EMAIL must be"),
    ],
)
def test_bad_reminder_settings_stop_the_process(env, says):
    result = run_check(env)
    assert result.returncode != 0
    assert says in result.stderr


def test_mask_email():
    assert mask_email("bob@example.com") == "b***@example.com"
    assert mask_email("not-an-address") == "***"
