"""What ``check_health`` checks: the database, Redis, a worker, beat. Each check returns problems."""

from __future__ import annotations

from collections.abc import Callable

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone
from django.utils.translation import gettext as _

CHECKS = ("database", "redis", "worker", "beat")


def health_database() -> list[str]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return [_("database: not reachable (%(error)s)") % {"error": type(exc).__name__}]
    return []


def health_redis() -> list[str]:
    if not settings.REDIS_URL:
        return []
    from leasesite.redis_client import get_redis

    try:
        get_redis().ping()
    except (redis.RedisError, OSError) as exc:
        return [_("redis: not reachable (%(error)s)") % {"error": type(exc).__name__}]
    return []


def health_worker(*, node: str | None = None, timeout: float = 3.0) -> list[str]:
    from leasesite.celery import app

    try:
        replies = app.control.ping(destination=[node] if node else None, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any broker failure is "no worker answered", said in one line
        return [_("worker: the broker is not reachable (%(error)s)") % {"error": type(exc).__name__}]
    if not replies:
        if node:
            return [
                _("worker: %(node)s did not answer a ping within %(seconds)s s") % {"node": node, "seconds": timeout}
            ]
        return [_("worker: no worker answered a ping within %(seconds)s s") % {"seconds": timeout}]
    return []


def health_beat(*, max_age_seconds: int | None = None) -> list[str]:
    from leasesite.models import JobSuccess
    from leasesite.schedules import HEARTBEAT_EVERY_SECONDS
    from leasesite.tasks import HEARTBEAT_TASK

    # DESIGN §6: beat is alive when its periodic task ran within twice its interval.
    limit = max_age_seconds or 2 * HEARTBEAT_EVERY_SECONDS
    try:
        beat_at = JobSuccess.objects.filter(task=HEARTBEAT_TASK).values_list("succeeded_at", flat=True).first()
    except DatabaseError as exc:
        return [_("beat: cannot read the heartbeat (%(error)s)") % {"error": type(exc).__name__}]
    if beat_at is None:
        return [_("beat: no heartbeat recorded yet (is beat running, and a worker taking its tasks?)")]
    age = (timezone.now() - beat_at).total_seconds()
    if age > limit:
        return [
            _("beat: last heartbeat %(age)d s ago (more than %(limit)d s): beat is down, or no worker runs its tasks")
            % {"age": age, "limit": limit}
        ]
    return []


def health_problems(*, only: tuple[str, ...] = CHECKS, worker_node: str | None = None) -> list[str]:
    checks: dict[str, Callable[[], list[str]]] = {
        "database": health_database,
        "redis": health_redis,
        "worker": lambda: health_worker(node=worker_node),
        "beat": health_beat,
    }
    problems: list[str] = []
    for name in only:
        problems.extend(checks[name]())
    return problems
