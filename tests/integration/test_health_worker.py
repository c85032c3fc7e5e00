"""check_health against a real worker: the heartbeat task runs, its success is recorded, all is well."""

from __future__ import annotations

import os
import time

import pytest
from django.core.management import call_command

from leasesite.models import JobSuccess

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_worker_runs_the_heartbeat_and_check_health_is_happy(start_workers, capsys):
    start_workers(1)
    from leasesite.tasks import heartbeat

    heartbeat.delay()
    deadline = time.monotonic() + 60
    while not JobSuccess.objects.filter(task="leasesite.heartbeat").exists():
        assert time.monotonic() < deadline, "the worker did not record the heartbeat"
        time.sleep(0.2)
    call_command("check_health", worker=f"test0-{os.getpid()}@{os.uname().nodename}")
    assert "database, redis, worker, beat" in capsys.readouterr().out
