"""Default beat schedules (DESIGN §7), installed idempotently.

Existing entries are matched by name and left as operators edited them in the admin; only
missing ones are created. Names are in the operators' language (``DJANGO_LANGUAGE_CODE``); each
default also has a stable English ``key`` — what earlier versions stored as its name — so rows
installed under the English name are renamed in place (keeping every operator edit) by the
migration ``leasesite.0005`` and by every install. Every periodic task gets ``expire_seconds`` ≈ 1.5 × its interval so a
backlog of stale runs never piles up behind a stopped worker.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import translation
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefaultSchedule:
    key: str  # stable, English: the name earlier versions installed
    title: Promise  # the name operators see, translated
    task: str
    kwargs: dict = field(default_factory=dict)
    every_minutes: int | None = None
    every_seconds: int | None = None
    crontab: tuple[str, str, str] | None = None  # minute, hour, day_of_week
    expire_seconds: int = 3600

    @property
    def name(self) -> str:
        with translation.override(settings.LANGUAGE_CODE):
            return str(self.title)


HEARTBEAT_EVERY_SECONDS = 30

DEFAULT_SCHEDULES: list[DefaultSchedule] = [
    DefaultSchedule(
        key="leasesite: heartbeat",
        title=_("Heartbeat (beat is alive)"),
        task="leasesite.heartbeat",
        every_seconds=HEARTBEAT_EVERY_SECONDS,
        expire_seconds=HEARTBEAT_EVERY_SECONDS,
    ),
    DefaultSchedule(
        key="tokens: refresh tokens used within 7 days",
        title=_("Refresh tokens used within 7 days"),
        task="tokens.refresh_tokens",
        kwargs={"max_age_days": 7},
        every_minutes=6 * 60,
        expire_seconds=9 * 3600,
    ),
    DefaultSchedule(
        key="tokens: refresh all tokens",
        title=_("Refresh all tokens"),
        task="tokens.refresh_tokens",
        kwargs={"max_age_days": None},
        crontab=("0", "2", "*"),
        expire_seconds=36 * 3600,
    ),
    DefaultSchedule(
        key="tokens: clean up tokens unused for 30 days",
        title=_("Clean up tokens unused for 30 days"),
        task="tokens.cleanup_tokens",
        kwargs={"days": 30},
        crontab=("0", "3", "0"),
        expire_seconds=36 * 3600,
    ),
    DefaultSchedule(
        key="tokens: sweep refresh runs",
        title=_("Sweep stalled refresh runs"),
        task="tokens.sweep_runs",
        every_minutes=1,
        expire_seconds=90,
    ),
    DefaultSchedule(
        key="leases: join sync",
        title=_("Join sync of every team"),
        task="leases.sync_joins",
        every_minutes=5,
        expire_seconds=450,
    ),
    DefaultSchedule(
        key="leases: transfer due leases",
        title=_("Transfer due leases"),
        task="leases.run_transfers",
        every_minutes=5,
        expire_seconds=450,
    ),
    DefaultSchedule(
        key="leases: orphan check",
        title=_("Orphan check"),
        task="leases.check_orphans",
        every_minutes=60,
        expire_seconds=90 * 60,
    ),
    DefaultSchedule(
        key="leases: customer reminders",
        title=_("Customer reminders"),
        task="leases.send_reminders",
        crontab=("0", "10", "*"),
        expire_seconds=12 * 3600,
    ),
]


def schedules_rename(periodic_task_model: type, schedules: list[DefaultSchedule] | None = None) -> int:
    """Rename default rows still under their English key to the translated name (the model is a
    parameter so the data migration can pass its historical one). Returns how many."""
    renamed = 0
    for item in schedules or DEFAULT_SCHEDULES:
        name = item.name
        if name == item.key or periodic_task_model.objects.filter(name=name).exists():
            continue
        renamed += periodic_task_model.objects.filter(name=item.key).update(name=name)
    return renamed


def schedules_install(*, schedules: list[DefaultSchedule] | None = None) -> tuple[int, int]:
    """Create the missing default schedules. Returns (created, already_present)."""
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    created = present = 0
    with transaction.atomic():
        schedules_rename(PeriodicTask, schedules)
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
