"""Reminder mails to customers (DESIGN §2, §6: task ``leases.send_reminders``, daily at 10:00).

Two kinds, each recorded as a ``reminded`` event of the lease (``leases.events.reminded``) once
its mail was accepted by the mail server — never before, so a mail that failed is tried again by
the next run, and never twice, so a second run sends nothing:

- ``ends``: for each threshold ``d`` of ``LEASE_REMINDER_DAYS`` (default 7, 3, 1), an open lease
  that holds or is getting a seat (active, pending, transferring, failed — not waiting, never a
  final one) whose ``ends_at`` is in the future and at most ``d`` days away. The event records
  ``days=d`` and the ``ends_at`` it was about, so a renewal (``ends_at`` moved) gets fresh
  reminders. When several thresholds are due at once (a run was missed, or the lease was first
  seen 2 days before its end: 7 and 3 are both due), one mail goes out, for the smallest due
  threshold, and its event stands for the larger thresholds too: a threshold counts as done when
  an event for the same ``ends_at`` has ``days`` at most that threshold. So no customer gets
  three mails in one morning, a late threshold is never sent after a nearer one, and the history
  holds exactly the mails that were sent.
- ``accept``: a pending lease whose invitation (``invited_at``) is at least
  ``LEASE_ACCEPT_REMINDER_DAYS`` days old and which got no ``accept`` reminder since that
  invitation (a new invitation moves ``invited_at``, and may earn one more).

Leases are read in primary-key chunks (team joined in), with the ``reminded`` events of a chunk
in one more query; each mail then costs its send and one ``lease_step`` (the event). All mails of
a run share one SMTP connection (reopened after a failure); a mail that fails is counted and
logged with the address masked, and the run goes on. When a run has at least
``LEASE_REMINDER_FAILURE_ALERT`` failures, people are alerted (key ``leases:reminders:failing``,
de-duplicated). A database lock keeps two runs from mailing the same customers at once.

Mails are rendered in ``LANGUAGE_CODE`` and show times in ``TIME_ZONE`` (the customers' site
language and calendar, whoever runs the task), from ``leases/templates/leases/mail/``: a subject,
a plain-text body and an HTML alternative. Links are absolute, from ``LEASE_PUBLIC_BASE_URL``.
They hold nothing secret: the lease's public status page and the public redemption form.
"""

from __future__ import annotations

import logging
import re
import smtplib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.db.models import Q
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.html import format_html
from django.utils.translation import gettext as _

from leases import events
from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease
from leases.services.transitions import LeaseError, lease_step
from leasesite.locks import lock_acquire, lock_release, lock_renew
from leasesite.notify import alert_send

logger = logging.getLogger(__name__)

ENDS = "ends"
ACCEPT = "accept"
# Statuses that hold (or are about to get) a seat whose end is worth announcing.
ENDS_STATUSES = (LeaseStatus.ACTIVE, LeaseStatus.PENDING, LeaseStatus.TRANSFERRING, LeaseStatus.FAILED)
BATCH_SIZE = 200
FAILING_ALERT_KEY = "leases:reminders:failing"
LOCK_NAME = "leases:reminders"
LOCK_TTL_SECONDS = 900
TEMPLATE_DIR = "leases/mail"
# Errors of one message: the server refused it, the connection broke, or the address cannot be
# written in a mail header. Anything else is a bug and stops the run.
MAIL_ERRORS = (smtplib.SMTPException, OSError, ValueError)


@dataclass
class ReminderRun:
    sent: int = 0  # mails the server accepted
    failed: int = 0  # mails that could not be sent (no event: the next run tries again)
    skipped: int = 0  # leases looked at that needed no mail now (already reminded)
    unrecorded: int = 0  # sent, but the lease changed meanwhile and took no event
    busy: bool = False  # another run held the lock: this one did nothing

    def summary(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "skipped": self.skipped,
            "unrecorded": self.unrecorded,
            "busy": int(self.busy),
        }


@dataclass(frozen=True)
class Reminder:
    kind: str  # ENDS | ACCEPT
    days: int | None  # the threshold, for ENDS


def mask_email(email: str) -> str:
    """``bob@example.com`` → ``b***@example.com`` (what logs may say about a customer)."""
    local, at, domain = email.partition("@")
    return f"{local[:1]}***{at}{domain}" if at else "***"


_ADDRESS = re.compile(r"([^\s<>()\[\]@'\"]?)[^\s<>()\[\]@'\"]*@(?=[\w-])")


def _describe(exc: BaseException) -> str:
    """A mail error for the log, every address in it masked (servers echo the recipient)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = sorted({code for code, _message in exc.recipients.values()})
        text = f"recipient refused ({', '.join(map(str, codes))})"
    elif isinstance(exc, smtplib.SMTPResponseException):
        error = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        text = f"{exc.smtp_code} {error}"
    elif isinstance(exc, ValueError):
        text = "the address cannot be written in a mail header"  # the error quotes the address
    else:
        text = str(exc)
    return f"{type(exc).__name__}: {_ADDRESS.sub(lambda m: m.group(1) + '***@', text)}"[:300]


def _parse_iso(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


@dataclass
class _History:
    """A lease's earlier reminders, as far as the decisions below need them."""

    ends: list[tuple[datetime, int]]  # (ends_at, days) of each ``ends`` reminder
    accepts: list[datetime]  # when each ``accept`` reminder was recorded


def _histories(lease_ids: list[int]) -> dict[int, _History]:
    """The ``reminded`` events of these leases, in one query."""
    found: dict[int, _History] = {}
    rows = LeaseEvent.objects.filter(lease_id__in=lease_ids, action=LeaseAction.REMINDED).values_list(
        "lease_id", "detail", "created_at"
    )
    for lease_id, detail, created_at in rows:
        history = found.setdefault(lease_id, _History(ends=[], accepts=[]))
        detail = detail if isinstance(detail, dict) else {}
        if detail.get("kind") == ENDS:
            ends_at = _parse_iso(detail.get("ends_at"))
            if ends_at is not None and isinstance(detail.get("days"), int):
                history.ends.append((ends_at, detail["days"]))
        elif detail.get("kind") == ACCEPT:
            history.accepts.append(created_at)
    return found


def _ends_due(lease: MemberLease, history: _History, now: datetime, thresholds: list[int]) -> int | None:
    """The threshold to remind of now, or None (see the module docstring)."""
    if lease.status not in ENDS_STATUSES or lease.ends_at is None or lease.ends_at <= now:
        return None
    due = [days for days in thresholds if lease.ends_at <= now + timedelta(days=days)]
    if not due:
        return None
    smallest = min(due)
    if any(ends_at == lease.ends_at and days <= smallest for ends_at, days in history.ends):
        return None
    return smallest


def _accept_due(lease: MemberLease, history: _History, now: datetime, after_days: int) -> bool:
    if not after_days or lease.status != LeaseStatus.PENDING or lease.invited_at is None:
        return False
    if lease.invited_at > now - timedelta(days=after_days):
        return False
    return not any(at >= lease.invited_at for at in history.accepts)


def _candidates_q(now: datetime, thresholds: list[int], accept_days: int) -> Q | None:
    parts = []
    if thresholds:
        parts.append(Q(status__in=ENDS_STATUSES, ends_at__gt=now, ends_at__lte=now + timedelta(days=max(thresholds))))
    if accept_days:
        parts.append(Q(status=LeaseStatus.PENDING, invited_at__lte=now - timedelta(days=accept_days)))
    if not parts:
        return None
    query = parts[0]
    for part in parts[1:]:
        query |= part
    return query


def _absolute(path: str) -> str:
    return settings.LEASE_PUBLIC_BASE_URL + path


def _context(lease: MemberLease, now: datetime) -> dict[str, Any]:
    """What the templates may show: public facts of the lease, no secret, no internal error."""
    team = lease.team.name if lease.team_id and lease.status != LeaseStatus.FAILED else ""
    days_left = None
    if lease.ends_at is not None:
        # Calendar days in the site's time zone: "ends tomorrow" is about the customer's dates.
        days_left = max(0, (timezone.localdate(lease.ends_at) - timezone.localdate(now)).days)
    status_url = _absolute(reverse("leases:status", args=[lease.public_id]))
    renew_url = _absolute(reverse("leases:redeem"))
    return {
        "email": lease.email,
        "team": team,
        "ends_at": lease.ends_at,
        "days_left": days_left,
        "invited_at": lease.invited_at,
        "time_zone": settings.TIME_ZONE,
        "status_url": status_url,
        "renew_url": renew_url,
        # The same sentences in the HTML part, with the links clickable.
        "status_link": format_html('<a href="{0}">{0}</a>', status_url),
        "renew_link": format_html('<a href="{0}">{0}</a>', renew_url),
    }


def reminder_message(
    lease: MemberLease, reminder: Reminder, *, now: datetime, connection: Any = None
) -> EmailMultiAlternatives:
    """The mail of one reminder: subject, plain text and an HTML alternative, in the site's language
    and time zone."""
    name = "ends_reminder" if reminder.kind == ENDS else "accept_reminder"
    with translation.override(settings.LANGUAGE_CODE), timezone.override(settings.TIME_ZONE):
        context = _context(lease, now)
        subject = " ".join(render_to_string(f"{TEMPLATE_DIR}/{name}_subject.txt", context).split())
        text = render_to_string(f"{TEMPLATE_DIR}/{name}.txt", context)
        html = render_to_string(f"{TEMPLATE_DIR}/{name}.html", context)
    message = EmailMultiAlternatives(
        subject=subject,
        body=text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[lease.email],
        connection=connection,
        # RFC 3834: an automatic mail (no out-of-office answers to it).
        headers={"Auto-Submitted": "auto-generated"},
    )
    message.attach_alternative(html, "text/html")
    return message


class _Mailer:
    """One connection for the whole run; after a failed message it is closed and opened again
    for the next one (a refused message may leave the session unusable). When the server cannot
    be reached at all, the rest of the run fails fast instead of waiting out a timeout per mail."""

    def __init__(self) -> None:
        self.connection = get_connection(fail_silently=False)
        self.is_open = False
        self.unreachable = False

    def send(self, message: EmailMultiAlternatives, *, lease_id: int) -> bool:
        masked = mask_email(message.to[0])
        if not self.is_open:
            try:
                self.connection.open()
            except MAIL_ERRORS as exc:
                self.unreachable = True
                logger.error("reminders: the mail server cannot be reached (%s)", _describe(exc))
                return False
            self.is_open = True
        try:
            sent = self.connection.send_messages([message])
        except MAIL_ERRORS as exc:
            logger.warning("reminder mail to %s (lease %s) failed: %s", masked, lease_id, _describe(exc))
            self.close()
            return False
        if not sent:
            logger.warning("reminder mail to %s (lease %s) was not sent", masked, lease_id)
            return False
        return True

    def close(self) -> None:
        if self.is_open:
            try:
                self.connection.close()
            except MAIL_ERRORS:
                logger.debug("closing the mail connection failed", exc_info=True)
            self.is_open = False


def _record(lease: MemberLease, reminder: Reminder, run: ReminderRun) -> None:
    ends_at = lease.ends_at if reminder.kind == ENDS else None
    try:
        lease_step(
            lease_id=lease.pk,
            **events.reminded(kind=reminder.kind, days=reminder.days, ends_at=ends_at, to=lease.email),
        )
    except (LeaseError, MemberLease.DoesNotExist) as exc:
        run.unrecorded += 1
        logger.warning("reminder to %s (lease %s) sent but not recorded: %s", mask_email(lease.email), lease.pk, exc)


def reminders_send(now: datetime | None = None) -> ReminderRun:
    """Send every reminder that is due (module docstring). Safe to run twice at once: the second
    run finds the lock taken and does nothing (``busy``)."""
    now = now or timezone.now()
    run = ReminderRun()
    thresholds = list(settings.LEASE_REMINDER_DAYS)
    accept_days = settings.LEASE_ACCEPT_REMINDER_DAYS
    query = _candidates_q(now, thresholds, accept_days)
    if query is None:
        return run
    owner = uuid.uuid4().hex
    if not lock_acquire(name=LOCK_NAME, owner=owner, ttl_seconds=LOCK_TTL_SECONDS):
        logger.info("reminders: another run is in progress; nothing done")
        run.busy = True
        return run
    mailer = _Mailer()
    try:
        _send_all(run, mailer, query, now=now, thresholds=thresholds, accept_days=accept_days, owner=owner)
    finally:
        mailer.close()
        lock_release(name=LOCK_NAME, owner=owner)
    if run.failed >= settings.LEASE_REMINDER_FAILURE_ALERT or (run.failed and mailer.unreachable):
        alert_send(
            title=_("Reminder mails are failing"),
            body=_(
                "%(failed)d reminder mail(s) could not be sent in one run (%(sent)d sent). They are tried "
                "again at the next run; check EMAIL_URL and the mail server (the worker log has the errors)."
            )
            % {"failed": run.failed, "sent": run.sent},
            key=FAILING_ALERT_KEY,
        )
    logger.info("reminders %s", run.summary())
    return run


def _send_all(
    run: ReminderRun,
    mailer: _Mailer,
    query: Q,
    *,
    now: datetime,
    thresholds: list[int],
    accept_days: int,
    owner: str,
) -> None:
    last_pk = 0
    renewed_at = time.monotonic()
    while True:
        batch = list(
            MemberLease.objects.filter(query, pk__gt=last_pk).select_related("team").order_by("pk")[:BATCH_SIZE]
        )
        if not batch:
            return
        last_pk = batch[-1].pk
        histories = _histories([lease.pk for lease in batch])
        for lease in batch:
            history = histories.get(lease.pk) or _History(ends=[], accepts=[])
            due: list[Reminder] = []
            days = _ends_due(lease, history, now, thresholds)
            if days is not None:
                due.append(Reminder(ENDS, days))
            if _accept_due(lease, history, now, accept_days):
                due.append(Reminder(ACCEPT, None))
            if not due:
                run.skipped += 1
                continue
            for reminder in due:
                if mailer.unreachable:  # fail fast: no server to talk to in this run
                    run.failed += 1
                    continue
                message = reminder_message(lease, reminder, now=now, connection=mailer.connection)
                if mailer.send(message, lease_id=lease.pk):
                    run.sent += 1
                    _record(lease, reminder, run)
                else:
                    run.failed += 1
            # Slow mail servers: keep the lock while the run lasts (a renewal is one UPDATE).
            if time.monotonic() - renewed_at > LOCK_TTL_SECONDS / 3:
                if not lock_renew(name=LOCK_NAME, owner=owner, ttl_seconds=LOCK_TTL_SECONDS):
                    logger.warning("reminders: lost the run lock; stopping (the next run goes on)")
                    return
                renewed_at = time.monotonic()
        if len(batch) < BATCH_SIZE:
            return
