"""Queue routing: the refresh's batches can have workers of their own (CELERY_REFRESH_QUEUE)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.conf import settings

from tests.faults.processes import BASE, celery_worker, stop, wait_for
from tokens.models import RefreshBatch, RefreshRun, RunKind, RunStatus

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_refresh_work_goes_to_its_own_queue_and_only_its_workers_take_it(
    upstream, make_token, start_workers, live_server_env, tmp_path
):
    for _ in range(6):
        make_token()
    refresh_queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-refresh"
    env = {**live_server_env, "CELERY_REFRESH_QUEUE": refresh_queue, "BAOMING_BATCH_SIZE": "2"}
    start_workers(1, CELERY_REFRESH_QUEUE=refresh_queue, BAOMING_BATCH_SIZE="2")  # the default queue's worker
    refresh_worker = celery_worker(env, tmp_path / "refresh-worker.log", name="refresh", queue=refresh_queue)
    try:
        # Sent by a process configured like the deployment: the task goes to the refresh queue.
        sender = subprocess.run(
            [sys.executable, "-c", "import django; django.setup(); "
             "from tokens.tasks import refresh_tokens; refresh_tokens.delay(max_age_days=None)"],
            cwd=BASE, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sender.returncode == 0, sender.stderr

        def finished() -> RefreshRun | None:
            run = RefreshRun.objects.filter(kind=RunKind.REFRESH).first()
            return run if run is not None and run.is_final else None

        run = wait_for(finished, timeout=90, what="the refresh run to end")
        assert (run.status, run.total, run.batches_done) == (RunStatus.SUCCEEDED, 6, 3)
        assert len(upstream.requests) == 6
        assert RefreshBatch.objects.filter(run=run).count() == 3
    finally:
        stop(refresh_worker)
    refresh_log = (tmp_path / "refresh-worker.log").read_text()
    default_log = (tmp_path / "worker0.log").read_text()
    assert "Traceback" not in refresh_log
    # A batch task goes on with the run's next pending batches, so there may be fewer tasks than batches.
    assert "Task tokens.refresh_batch[" in refresh_log and "Task tokens.refresh_tokens[" in refresh_log
    assert "tokens.refresh" not in default_log.split("[tasks]")[-1].split("ready.")[-1]
