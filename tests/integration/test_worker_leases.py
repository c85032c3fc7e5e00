"""The lease tasks on real Celery worker processes: join sync, then transfers, over HTTP."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from leases.models import LeaseAction, LeaseStatus, MemberLease

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout}s")


def test_sync_and_transfer_tasks_on_workers(provider, make_team, make_lease, start_workers):
    alpha, beta = make_team("alpha"), make_team("beta")
    joining = make_lease(alpha)
    provider.state.team("alpha").add_member(joining.email)
    due = make_lease(
        alpha,
        LeaseStatus.ACTIVE,
        joined_at=timezone.now() - timedelta(days=40),
        expires_at=timezone.now() - timedelta(minutes=1),
    )
    provider.state.team("alpha").add_member(due.email)
    start_workers(2)

    from leases.tasks import check_orphans, run_transfers, sync_joins

    sync_joins.delay()
    wait_until(lambda: MemberLease.objects.get(pk=joining.pk).status == LeaseStatus.ACTIVE)
    run_transfers.delay()
    run_transfers.delay()  # a second run at the same time takes nothing twice
    wait_until(lambda: MemberLease.objects.get(pk=due.pk).status == LeaseStatus.PENDING)
    due.refresh_from_db()
    assert due.team == beta
    assert due.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
    assert provider.state.team("beta").invite_posts == [due.email]
    assert due.email not in provider.state.team("alpha").member_emails()
    check_orphans.delay()
    wait_until(lambda: provider.state.calls(method="GET") >= 4 + 2)  # the orphan check listed both teams
