"""check_health: one line per problem, exit 1; the heartbeat schedule; job successes on /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from leasesite.jobs import job_success_on_task_success, job_success_record
from leasesite.models import JobSuccess

BASE = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db


def test_setup_schedules_installs_the_heartbeat_every_30_seconds():
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    call_command("setup_schedules")
    task = PeriodicTask.objects.get(task="leasesite.heartbeat")
    assert (task.interval.every, task.interval.period) == (30, IntervalSchedule.SECONDS)
    assert task.expire_seconds == 30


def test_a_stale_heartbeat_is_a_beat_problem(capsys):
    job_success_record(task="leasesite.heartbeat", at=timezone.now() - timedelta(minutes=5))
    with pytest.raises(CommandError) as raised:
        call_command("check_health", only=("beat",))
    assert raised.value.returncode == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"beat：最近一次心跳在 (299|300|301) 秒前.*", line), line


def test_a_fresh_heartbeat_is_healthy(capsys):
    job_success_record(task="leasesite.heartbeat")
    call_command("check_health", only=("database", "redis", "beat"))
    assert capsys.readouterr().out.strip() == "正常：database, redis, beat"


def test_no_heartbeat_at_all_says_so(capsys):
    with pytest.raises(CommandError):
        call_command("check_health", only=("beat",))
    assert "心跳" in capsys.readouterr().err


def test_no_worker_answering_is_a_problem(capsys):
    with pytest.raises(CommandError):
        call_command("check_health", only=("worker",), worker="nobody-here@nowhere")
    assert "nobody-here@nowhere" in capsys.readouterr().err


def test_only_periodic_jobs_record_their_success():
    class Task:
        def __init__(self, name):
            self.name = name

    job_success_on_task_success(sender=Task("tokens.refresh_batch"))  # a batch of a run: not a periodic job
    job_success_on_task_success(sender=Task("leases.sync_joins"))
    assert list(JobSuccess.objects.values_list("task", flat=True)) == ["leases.sync_joins"]


def test_metrics_show_each_jobs_last_success(client, settings):
    settings.METRICS_TOKEN = "health-metrics"
    at = timezone.now() - timedelta(seconds=42)
    job_success_record(task="leases.run_transfers", at=at)
    body = client.get("/metrics", HTTP_AUTHORIZATION="Bearer health-metrics").content.decode()
    samples = {
        sample.labels["task"]: sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "leasesite_job_last_success_timestamp_seconds"
        for sample in family.samples
    }
    assert samples == {"leases.run_transfers": pytest.approx(at.timestamp())}


def run_check_health(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check_health", *args],
        cwd=BASE,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "leasesite.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_redis_unreachable_exits_non_zero_with_one_line():
    result = run_check_health("--only", "redis", REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("redis")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_check_name_is_refused_precisely():
    result = run_check_health("--only", "database,moon")
    assert result.returncode != 0
    assert "choose from database, redis, worker, beat" in result.stderr
