"""Alerts to people: always logged; also sent to every ``NOTIFY_URLS`` target through Apprise.

Alerts fire on changes, not on states (healthchecks' flips):

- ``alert_problem(key=...)`` announces a problem when it starts; while it lasts, calling it again
  sends nothing — unless its ``fingerprint`` (e.g. a digest of a check's findings) changed: then
  the change is announced.
- ``alert_resolved(key=...)`` sends "resolved" when a problem that was announced clears.
- ``alert_send(key=...)`` is a one-off alert; the same key is sent at most once per
  ``ALERT_DEDUP_SECONDS``.

The state of each key lives in the database (``leasesite.AlertState``), so every process of every
host agrees on what was already said. Sending never raises: an alert that cannot be delivered,
or whose state cannot be read, is logged instead (and sent without de-duplication when the
database is unreachable: a lost alert is worse than a repeated one).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from leasesite.log_filters import scrub_secrets

logger = logging.getLogger("leasesite.alerts")

MAX_KEY_LENGTH = 200


def _deliver(*, title: str, body: str, level: str) -> bool:
    """Log and send one alert; True when at least one target accepted it (or none is configured)."""
    title, body = scrub_secrets(title), scrub_secrets(body or title)  # Apprise refuses an empty body
    log = logger.error if level == "error" else logger.warning
    log("ALERT %s: %s", title, body)
    urls = settings.NOTIFY_URLS
    if not urls:
        return True
    try:
        import apprise

        notifier = apprise.Apprise()
        for url in urls:
            notifier.add(url)
        notify_type = {
            "error": apprise.NotifyType.FAILURE,
            "success": apprise.NotifyType.SUCCESS,
        }.get(level, apprise.NotifyType.WARNING)
        delivered = bool(notifier.notify(title=title, body=body, notify_type=notify_type))
    except Exception:
        logger.exception("alert delivery failed")
        return False
    if not delivered:
        logger.error("alert delivery failed for every NOTIFY_URLS target")
    return delivered


def _state_row(key: str):
    from leasesite.models import AlertState

    key = key[:MAX_KEY_LENGTH]
    try:
        with transaction.atomic():
            AlertState.objects.get_or_create(key=key)
    except IntegrityError:
        pass  # created by a concurrent caller
    return AlertState.objects.filter(key=key)


def _dedup_cutoff():
    return timezone.now() - timedelta(seconds=settings.ALERT_DEDUP_SECONDS)


def alert_send(*, title: str, body: str, level: str = "warning", key: str | None = None) -> bool:
    """Send a one-off alert. With ``key``, the same key is sent at most once per
    ``ALERT_DEDUP_SECONDS`` (a suppressed repeat is logged at INFO). Returns whether it was
    delivered (False when suppressed or undeliverable)."""
    if key:
        try:
            with transaction.atomic():
                row = _state_row(key)
                # The conditional UPDATE's count says who may send: two processes never both do.
                due = Q(last_sent_at__isnull=True) | Q(last_sent_at__lt=_dedup_cutoff())
                claimed = row.filter(due).update(last_sent_at=timezone.now(), last_title=title[:200])
        except DatabaseError:
            logger.warning("alert state unavailable; sending %r without de-duplication", key)
            claimed = 1
        if not claimed:
            logger.info("alert %r suppressed (sent within ALERT_DEDUP_SECONDS): %s", key, scrub_secrets(title))
            return False
    return _deliver(title=title, body=body, level=level)


def alert_problem(*, key: str, title: str, body: str, level: str = "warning", fingerprint: str = "") -> bool:
    """A problem is present. Alerts when it starts (once), and again when its ``fingerprint``
    changes; True when this call sent an alert."""
    now = timezone.now()
    fingerprint = fingerprint[:64]
    try:
        with transaction.atomic():
            row = _state_row(key)
            started = row.filter(active=False).update(active=True, since=now, notified=False, fingerprint=fingerprint)
            if not started:
                # Ongoing and unchanged: already said. Ongoing with other findings: new
                # information, announced whatever the de-duplication window says.
                if not row.exclude(fingerprint=fingerprint).update(
                    fingerprint=fingerprint, notified=True, last_sent_at=now, last_title=title[:200]
                ):
                    return False
            else:
                # A problem that starts again within the de-duplication window (it flaps) is not
                # announced again, and then its "resolved" is not sent either.
                due = Q(last_sent_at__isnull=True) | Q(last_sent_at__lt=_dedup_cutoff())
                if not row.filter(due).update(notified=True, last_sent_at=now, last_title=title[:200]):
                    logger.info("alert %r started again within ALERT_DEDUP_SECONDS; not re-sent", key)
                    return False
    except DatabaseError:
        logger.warning("alert state unavailable; sending %r without de-duplication", key)
    return _deliver(title=title, body=body, level=level)


def alert_resolved(*, key: str, title: str, body: str = "") -> bool:
    """The problem of ``key`` is gone. Sends "resolved" if its start was announced."""
    from leasesite.models import AlertState

    try:
        with transaction.atomic():
            state = AlertState.objects.select_for_update().filter(key=key[:MAX_KEY_LENGTH], active=True).first()
            if state is None:
                return False
            announced = state.notified
            AlertState.objects.filter(pk=state.pk).update(active=False, notified=False, fingerprint="")
    except DatabaseError:
        logger.warning("alert state unavailable; %r not resolved", key)
        return False
    if not announced:
        return False
    return _deliver(title=_("Resolved: %(title)s") % {"title": title}, body=body, level="success")


def alert_is_active(key: str) -> bool:
    from leasesite.models import AlertState

    return AlertState.objects.filter(key=key[:MAX_KEY_LENGTH], active=True).exists()
