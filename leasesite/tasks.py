"""Operations tasks (thin)."""

from __future__ import annotations

from celery import shared_task

HEARTBEAT_TASK = "leasesite.heartbeat"


@shared_task(name=HEARTBEAT_TASK, ignore_result=True)
def heartbeat() -> None:
    """Does nothing: its recorded success (``leasesite.jobs``) is the proof that beat and a worker live."""
