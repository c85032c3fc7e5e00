"""The run sweeper (``tokens.sweep_runs``, every minute): no refresh run stays ``running`` unseen.

Batch messages get lost — Redis restarted, a worker killed with -9 before it acked (Redis only
redelivers after its 4 h visibility timeout). Every minute the sweeper looks at each live run:

- its lock is held by another run, or gone → ``abandoned`` (alert);
- every batch recorded but the run not finalized (its worker died in between) → finalize it;
- worked by one process (the command) whose lock expired → that process died: ``abandoned``;
- dispatched to workers, no sign of life for ``BAOMING_SWEEP_GRACE_SECONDS`` → send its pending
  batches (and those whose claim expired) to the broker again, and renew the run's lock so no
  new run takes it over while they wait in the queue; a batch already sent again
  ``BAOMING_SWEEP_MAX_REDISPATCHES`` times means no worker takes them: ``abandoned``;
- a dry run (no lock) without a sign of life for ``BAOMING_RUN_LOCK_TTL`` → ``abandoned``,
  without an alert (dry runs never alert).

Sending a batch twice is harmless: it is claimed before the upstream is called.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from leasesite.locks import lock_renew
from leasesite.models import JobLock
from tokens.models import LIVE_RUN_STATUSES, BatchStatus, RefreshBatch, RefreshRun, RunKind, RunStatus
from tokens.services.refresh import REFRESH_LOCK_NAME, token_refresh_abandon, token_refresh_finalize_if_complete

logger = logging.getLogger(__name__)


@dataclass
class SweepReport:
    redispatched: int = 0
    abandoned: int = 0
    finalized: int = 0


def _lost_batches(run: RefreshRun, *, now, sent_before) -> list[RefreshBatch]:
    unfinished = Q(status=BatchStatus.PENDING) | Q(status=BatchStatus.CLAIMED, claimed_until__lt=now)
    not_sent_lately = Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=sent_before)
    return list(run.batches.filter(unfinished, not_sent_lately).order_by("number").only("id", "redispatches"))


def _redispatch(run: RefreshRun, batches: list[RefreshBatch], *, now, sent_before, dispatch) -> int:
    sent: list[int] = []
    with transaction.atomic():
        for batch in batches:
            # Compare-and-swap on the count, so two sweepers at once send each batch once.
            if (
                RefreshBatch.objects.filter(pk=batch.pk, redispatches=batch.redispatches)
                .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=sent_before))
                .update(redispatches=batch.redispatches + 1, dispatched_at=now)
            ):
                sent.append(batch.pk)
        if not sent:
            return 0
        # The re-sent batches may wait in the queue a while: keep the run's lock meanwhile.
        if not lock_renew(name=REFRESH_LOCK_NAME, owner=run.lock_owner, ttl_seconds=settings.BAOMING_RUN_LOCK_TTL):
            transaction.set_rollback(True)
            return 0

        def send() -> None:
            for batch_id in sent:
                dispatch(batch_id)

        transaction.on_commit(send)
    logger.warning(
        "refresh run #%s showed no sign of life for %ss: sent %d batch(es) to the workers again",
        run.pk,
        settings.BAOMING_SWEEP_GRACE_SECONDS,
        len(sent),
    )
    return len(sent)


def refresh_runs_sweep(*, dispatch: Callable[[int], None]) -> SweepReport:
    """Look at every live refresh run once; ``dispatch(batch_id)`` sends a batch to the workers."""
    report = SweepReport()
    now = timezone.now()
    grace_cutoff = now - timedelta(seconds=settings.BAOMING_SWEEP_GRACE_SECONDS)
    live = RefreshRun.objects.filter(kind=RunKind.REFRESH, status__in=LIVE_RUN_STATUSES).order_by("id")
    for run in live:
        # Read the lock after the run: a run takes its lock before its row exists, so a run we
        # see whose lock is not its own really lost it (read before, a run started in between
        # would look lockless).
        lock = JobLock.objects.filter(name=REFRESH_LOCK_NAME).first()
        last_sign_of_life = run.heartbeat_at or run.started_at
        if run.dry_run:
            if last_sign_of_life < now - timedelta(seconds=settings.BAOMING_RUN_LOCK_TTL):
                report.abandoned += token_refresh_abandon(run_id=run.pk, reason="no sign of life (dry run)")
            continue
        if lock is None or lock.owner != run.lock_owner:
            report.abandoned += token_refresh_abandon(run_id=run.pk, reason="its lock is gone or held by another run")
            continue
        if run.status == RunStatus.RUNNING and run.batches_done == run.batches_total:
            token_refresh_finalize_if_complete(run_id=run.pk)
            report.finalized += 1
            continue
        lock_expired = lock.expires_at < now
        if run.status == RunStatus.FINALIZING or not run.dispatched:
            # Worked by one process that renews the lock while alive: an expired lock means it died.
            if lock_expired:
                report.abandoned += token_refresh_abandon(
                    run_id=run.pk, reason="the process working it stopped renewing its lock (killed?)"
                )
            continue
        if last_sign_of_life >= grace_cutoff:
            continue  # a worker is on it, or its batches were just (re)sent
        lost = _lost_batches(run, now=now, sent_before=grace_cutoff)
        if not lost:
            continue  # what is left is claimed by workers whose claims have not expired yet
        limit = settings.BAOMING_SWEEP_MAX_REDISPATCHES
        if any(batch.redispatches >= limit for batch in lost):
            report.abandoned += token_refresh_abandon(
                run_id=run.pk, reason=f"no worker took its batches, sent again {limit} time(s)"
            )
            continue
        report.redispatched += _redispatch(run, lost, now=now, sent_before=grace_cutoff, dispatch=dispatch)
    return report
