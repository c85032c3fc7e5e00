"""The low-seat warning: an alert (once per change) when a pool's free seats fall below
``LEASE_LOW_SEATS`` or its waiting list grows; "resolved" when seats are back and nobody waits.

Checked after every redemption, waiting-list drain and join sync. The alert state is shared by
every process (``leasesite.notify``): the key is per pool, the fingerprint is the free-seat band
and the waiting count, so the same situation is announced once, a longer queue again.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError
from django.utils.translation import gettext as _

from leasesite.notify import alert_is_active, alert_problem, alert_resolved

logger = logging.getLogger(__name__)


def lowseats_key(pool: str) -> str:
    return f"leases:low_seats:{pool}"


def _previous_peak(key: str) -> int:
    from leasesite.models import AlertState

    fingerprint = AlertState.objects.filter(key=key, active=True).values_list("fingerprint", flat=True).first() or ""
    for part in fingerprint.split(";"):
        if part.startswith("peak=") and part[5:].isdigit():
            return int(part[5:])
    return 0


def lowseats_check(*, pool: str) -> str:
    """``alerted`` / ``resolved`` / ``ok`` / ``unchanged``. Never raises (a redemption must not fail
    because the alert could not be evaluated)."""
    from leases.services.waiting import pool_seats

    try:
        free, waiting = pool_seats(pool)
        key = lowseats_key(pool)
        low = free < settings.LEASE_LOW_SEATS
        if low or waiting:
            title = _("Few free seats in pool %(pool)s") % {"pool": pool}
            body = _(
                "Pool %(pool)s has %(free)d free seat(s) (warning below %(limit)d) and %(waiting)d lease(s) "
                "waiting for a seat. Add a team or seats to this pool."
            ) % {"pool": pool, "free": free, "limit": settings.LEASE_LOW_SEATS, "waiting": waiting}
            # News: seats falling below the limit, and the queue growing past its longest so far
            # (a queue that shrinks, or seats coming and going below the limit, are not).
            peak = max(waiting, _previous_peak(key))
            sent = alert_problem(key=key, title=title, body=body, fingerprint=f"low={low};peak={peak}")
            return "alerted" if sent else "unchanged"
        if alert_is_active(key):
            alert_resolved(
                key=key,
                title=_("Seats available again in pool %(pool)s") % {"pool": pool},
                body=_("Pool %(pool)s has %(free)d free seat(s) and nobody waiting.") % {"pool": pool, "free": free},
            )
            return "resolved"
        return "ok"
    except DatabaseError:
        logger.warning("low-seat check of pool %s failed", pool, exc_info=True)
        return "unchanged"
