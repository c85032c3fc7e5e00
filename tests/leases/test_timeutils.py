from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from leases.timeutils import add_months

SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (datetime(2026, 1, 31, 10, 0, tzinfo=SHANGHAI), 1, datetime(2026, 2, 28, 10, 0, tzinfo=SHANGHAI)),
        (datetime(2028, 1, 31, 10, 0, tzinfo=SHANGHAI), 1, datetime(2028, 2, 29, 10, 0, tzinfo=SHANGHAI)),  # leap
        (datetime(2028, 2, 29, 9, 30, tzinfo=SHANGHAI), 12, datetime(2029, 2, 28, 9, 30, tzinfo=SHANGHAI)),
        (datetime(2026, 3, 31, 0, 0, tzinfo=SHANGHAI), 1, datetime(2026, 4, 30, 0, 0, tzinfo=SHANGHAI)),
        (datetime(2026, 11, 30, 12, 0, tzinfo=SHANGHAI), 3, datetime(2027, 2, 28, 12, 0, tzinfo=SHANGHAI)),
        (datetime(2026, 5, 15, 8, 0, tzinfo=SHANGHAI), 0, datetime(2026, 5, 15, 8, 0, tzinfo=SHANGHAI)),
        (datetime(2026, 12, 31, 23, 59, tzinfo=SHANGHAI), 2, datetime(2027, 2, 28, 23, 59, tzinfo=SHANGHAI)),
    ],
)
def test_calendar_months_clamped_to_month_end(settings, start, months, expected):
    settings.TIME_ZONE = "Asia/Shanghai"
    assert add_months(start, months) == expected


def test_months_follow_the_local_calendar_not_utc(settings):
    settings.TIME_ZONE = "Asia/Shanghai"
    # 2026-02-28 20:00 UTC is already March 1st, 04:00 in Shanghai: one month later is April 1st
    # there (in UTC arithmetic it would have been March 28th).
    joined = datetime(2026, 2, 28, 20, 0, tzinfo=UTC)
    result = add_months(joined, 1)
    assert timezone.localtime(result) == datetime(2026, 4, 1, 4, 0, tzinfo=SHANGHAI)
    assert result == datetime(2026, 3, 31, 20, 0, tzinfo=UTC)


def test_wall_clock_kept_across_a_dst_change(settings):
    settings.TIME_ZONE = "Europe/Berlin"
    berlin = ZoneInfo("Europe/Berlin")
    joined = datetime(2026, 3, 15, 9, 0, tzinfo=berlin)  # CET, UTC+1
    result = add_months(joined, 1)  # April: CEST, UTC+2
    assert timezone.localtime(result).replace(tzinfo=None) == datetime(2026, 4, 15, 9, 0)
    assert result.utcoffset() is not None
    assert (result.astimezone(UTC) - joined.astimezone(UTC)).total_seconds() == 31 * 86400 - 3600


def test_refuses_naive_and_negative():
    with pytest.raises(ValueError, match="aware"):
        add_months(datetime(2026, 1, 1), 1)
    with pytest.raises(ValueError, match="negative"):
        add_months(datetime(2026, 1, 1, tzinfo=UTC), -1)
