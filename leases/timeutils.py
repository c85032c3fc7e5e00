"""Calendar-month arithmetic in the operators' time zone.

A term of N months ends on the same wall-clock day N months later in ``TIME_ZONE`` (the customer's
calendar, not UTC's), clamped to the last day of a shorter month: Jan 31 + 1 month = Feb 28 (Feb 29
in a leap year). The result is an aware datetime; the database stores it in UTC.
"""

from __future__ import annotations

import calendar
from datetime import datetime

from django.utils import timezone


def add_months(moment: datetime, months: int) -> datetime:
    if months < 0:
        raise ValueError("months must not be negative")
    if timezone.is_naive(moment):
        raise ValueError("add_months needs an aware datetime")
    local = timezone.localtime(moment)
    month_index = local.month - 1 + months
    year = local.year + month_index // 12
    month = month_index % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    wall = local.replace(tzinfo=None, year=year, month=month, day=day)
    return timezone.make_aware(wall, timezone.get_current_timezone())
