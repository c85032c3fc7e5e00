"""A start barrier inside real worker processes (H5's duplicate-delivery tests).

Imported by a test's worker with ``celery worker -I tests.faults._h5_barrier``; it does nothing
unless the worker's environment names a barrier (``H5_BARRIER_KEY``, a Redis key prefix, and
``H5_BARRIER_REDIS``, the Redis URL) and the test armed it: ``{key}:tasks`` (a set of task names)
and ``{key}:count`` (how many deliveries to hold). Then the first ``count`` deliveries of those
tasks each record their arrival (``{key}:arrived``) and wait, in ``task_prerun`` (after the
worker took the message, before the task's body runs), until the test releases them all at once
(``{key}:go``). So two copies of one message start their work at the same moment, whichever
worker took which, without touching the code under test.
"""

from __future__ import annotations

import os

from celery.signals import task_prerun

RELEASE_TIMEOUT_SECONDS = 120


@task_prerun.connect(weak=False)
def _wait_at_barrier(sender: object = None, task_id: str | None = None, task: object = None, **kwargs: object) -> None:
    key = os.environ.get("H5_BARRIER_KEY")
    if not key:
        return
    import redis

    client = redis.Redis.from_url(os.environ["H5_BARRIER_REDIS"])
    if not client.sismember(f"{key}:tasks", getattr(task, "name", "")):
        return
    if client.incr(f"{key}:seen") > int(client.get(f"{key}:count") or 0):
        return
    client.rpush(f"{key}:arrived", f"{os.getpid()}:{task_id}")
    client.blpop([f"{key}:go"], timeout=RELEASE_TIMEOUT_SECONDS)
