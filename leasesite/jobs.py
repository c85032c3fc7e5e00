"""When each periodic job last succeeded: recorded by a Celery signal, read by health and metrics."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import DatabaseError
from django.utils import timezone

logger = logging.getLogger(__name__)


def periodic_task_names() -> frozenset[str]:
    """The tasks beat runs by default (DESIGN §7) and the heartbeat: the jobs whose last success matters."""
    from leasesite.schedules import DEFAULT_SCHEDULES

    return frozenset(item.task for item in DEFAULT_SCHEDULES)


def job_success_record(*, task: str, at: datetime | None = None) -> None:
    from leasesite.models import JobSuccess

    JobSuccess.objects.update_or_create(task=task, defaults={"succeeded_at": at or timezone.now()})


def job_success_on_task_success(sender: object = None, **kwargs: object) -> None:
    """``task_success`` handler: one upsert per periodic job run (never for the many batch tasks)."""
    name = getattr(sender, "name", None)
    if name not in periodic_task_names():
        return
    try:
        job_success_record(task=name)
    except DatabaseError:
        # Bookkeeping must never turn a finished job into a failed one.
        logger.warning("could not record the success of %s", name, exc_info=True)


def job_last_successes() -> dict[str, datetime]:
    from leasesite.models import JobSuccess

    return dict(JobSuccess.objects.values_list("task", "succeeded_at"))
