"""Default beat schedules (DESIGN §7), installed idempotently.

Existing entries are matched by name and left as operators edited them in the admin; only
missing ones are created. Every periodic task gets ``expire_seconds`` ≈ 1.5 × its interval so a
backlog of stale runs never piles up behind a stopped worker.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, connection, transaction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultSchedule:
    name: str
    task: str
    kwargs: dict = field(default_factory=dict)
    every_minutes: int | None = None
    every_seconds: int | None = None
    crontab: tuple[str, str, str] | None = None  # minute, hour, day_of_week
    expire_seconds: int = 3600


HEARTBEAT_EVERY_SECONDS = 30

DEFAULT_SCHEDULES: list[DefaultSchedule] = [
    DefaultSchedule(
        name="leasesite: heartbeat",
        task="leasesite.heartbeat",
        every_seconds=HEARTBEAT_EVERY_SECONDS,
        expire_seconds=HEARTBEAT_EVERY_SECONDS,
    ),
    DefaultSchedule(
        name="tokens: refresh tokens used within 7 days",
        task="tokens.refresh_tokens",
        kwargs={"max_age_days": 7},
        every_minutes=6 * 60,
        expire_seconds=9 * 3600,
    ),
    DefaultSchedule(
        name="tokens: refresh all tokens",
        task="tokens.refresh_tokens",
        kwargs={"max_age_days": None},
        crontab=("0", "2", "*"),
        expire_seconds=36 * 3600,
    ),
    DefaultSchedule(
        name="tokens: clean up tokens unused for 30 days",
        task="tokens.cleanup_tokens",
        kwargs={"days": 30},
        crontab=("0", "3", "0"),
        expire_seconds=36 * 3600,
    ),
    DefaultSchedule(
        name="tokens: sweep refresh runs",
        task="tokens.sweep_runs",
        every_minutes=1,
        expire_seconds=90,
    ),
    DefaultSchedule(
        name="leases: join sync",
        task="leases.sync_joins",
        every_minutes=5,
        expire_seconds=450,
    ),
    DefaultSchedule(
        name="leases: transfer due leases",
        task="leases.run_transfers",
        every_minutes=5,
        expire_seconds=450,
    ),
    DefaultSchedule(
        name="leases: orphan check",
        task="leases.check_orphans",
        every_minutes=60,
        expire_seconds=90 * 60,
    ),
]


def schedules_install(*, schedules: list[DefaultSchedule] | None = None) -> tuple[int, int]:
    """Create the missing default schedules. Returns (created, already_present)."""
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    created = present = 0
    with transaction.atomic():
        for item in schedules or DEFAULT_SCHEDULES:
            if PeriodicTask.objects.filter(name=item.name).exists():
                present += 1
                continue
            options: dict = {}
            if item.every_seconds is not None:
                interval, _ = IntervalSchedule.objects.get_or_create(
                    every=item.every_seconds, period=IntervalSchedule.SECONDS
                )
                options["interval"] = interval
            elif item.every_minutes is not None:
                interval, _ = IntervalSchedule.objects.get_or_create(
                    every=item.every_minutes, period=IntervalSchedule.MINUTES
                )
                options["interval"] = interval
            else:
                minute, hour, day_of_week = item.crontab or ("0", "*", "*")
                crontab, _ = CrontabSchedule.objects.get_or_create(
                    minute=minute,
                    hour=hour,
                    day_of_week=day_of_week,
                    day_of_month="*",
                    month_of_year="*",
                    timezone=settings.TIME_ZONE,
                )
                options["crontab"] = crontab
            PeriodicTask.objects.create(
                name=item.name,
                task=item.task,
                kwargs=json.dumps(item.kwargs),
                expire_seconds=item.expire_seconds,
                **options,
            )
            created += 1
    return created, present


def install_schedules_after_migrate(sender: object, using: str = "default", **kwargs: object) -> None:
    """post_migrate hook: a partial migrate (tables missing) is skipped, not an error."""
    tables = set(connection.introspection.table_names())
    if "django_celery_beat_periodictask" not in tables:
        return
    try:
        created, _ = schedules_install()
    except DatabaseError:
        logger.warning("default schedules not installed (database not ready)", exc_info=True)
        return
    if created and kwargs.get("verbosity", 1):
        logger.info("installed %d default beat schedule(s)", created)
