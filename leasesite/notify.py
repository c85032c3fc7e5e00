"""Alerts to people: always logged; also sent to every ``NOTIFY_URLS`` target through Apprise.

Sending never raises: an alert that cannot be delivered is logged as an error instead.
"""

from __future__ import annotations

import logging

from django.conf import settings

from leasesite.log_filters import scrub_secrets

logger = logging.getLogger("leasesite.alerts")


def alert_send(*, title: str, body: str, level: str = "warning") -> bool:
    """Send an alert; return True when at least one target accepted it (or none is configured)."""
    title, body = scrub_secrets(title), scrub_secrets(body)
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
        notify_type = apprise.NotifyType.FAILURE if level == "error" else apprise.NotifyType.WARNING
        delivered = bool(notifier.notify(title=title, body=body, notify_type=notify_type))
    except Exception:
        logger.exception("alert delivery failed")
        return False
    if not delivered:
        logger.error("alert delivery failed for every NOTIFY_URLS target")
    return delivered
