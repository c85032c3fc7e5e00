from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, TransferStep
from leases.providers import PermanentProviderError, TransientProviderError
from leases.services.transfers import transfer_backoff_seconds, transfers_preview, transfers_run

pytestmark = pytest.mark.django_db

BASE_DIR = Path(django_settings.BASE_DIR)


def _due(make_lease, provider, team, **kwargs) -> MemberLease:
    """An active lease whose term ended a minute ago, seated at the provider."""
    now = timezone.now()
    kwargs.setdefault("joined_at", now - timedelta(days=31))
    kwargs.setdefault("expires_at", now - timedelta(minutes=1))
    lease = make_lease(team, LeaseStatus.ACTIVE, **kwargs)
    member_id = provider.state.team(team.name).add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    lease.refresh_from_db()
    return lease


def _actions(lease: MemberLease) -> list[str]:
    return [a for a in lease.events.order_by("id").values_list("action", flat=True) if a != LeaseAction.NOTE]


def test_expired_term_moves_to_the_next_team(provider, make_team, make_lease):
    old, new = make_team("old"), make_team("new")
    lease = _due(make_lease, provider, old)
    created_at = lease.created_at

    result = transfers_run()

    assert result.summary() == {"claimed": 1, "transferred": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.PENDING and lease.team == new
    assert lease.invited_at is not None and lease.invited_at > lease.created_at
    assert (lease.joined_at, lease.expires_at, lease.provider_member_id) == (None, None, "")
    assert lease.created_at == created_at
    assert (lease.transfer_team, lease.transfer_step, lease.claimed_until) == (None, "", None)
    assert provider.state.team("new").invited_emails() == {lease.email}
    assert lease.email not in provider.state.team("old").member_emails()
    assert _actions(lease) == ["transfer_started", "invited", "left_old_team", "transferred"]
    started = lease.events.get(action=LeaseAction.TRANSFER_STARTED)
    assert started.detail["from_team"] == "old" and started.detail["to_team"] == "new"


def test_not_due_leases_are_left_alone(provider, make_team, make_lease):
    team = make_team("old")
    make_team("new")
    lease = make_lease(team, LeaseStatus.ACTIVE)  # expires in 10 days
    assert transfers_run().claimed == 0
    assert MemberLease.objects.get(pk=lease.pk).status == LeaseStatus.ACTIVE


def test_entitlement_over_removes_and_expires(provider, make_team, make_lease):
    old = make_team("old")
    make_team("new")
    lease = _due(make_lease, provider, old, ends_at=timezone.now() - timedelta(seconds=5))
    assert transfers_run().summary() == {"claimed": 1, "expired": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.EXPIRED and lease.team == old
    assert provider.state.team("old").member_emails() == set()
    assert provider.state.team("new").invite_posts == []
    assert _actions(lease) == ["transfer_started", "left_old_team", "expired"]


def test_next_team_prefers_covering_the_term(provider, make_team, make_lease):
    now = timezone.now()
    old = make_team("old")
    make_team("short", capacity=100, expires_at=now + timedelta(days=3))
    long = make_team("long", capacity=3)
    lease = _due(make_lease, provider, old)
    transfers_run()
    lease.refresh_from_db()
    assert lease.team == long


def test_no_free_seat_retries_later_with_backoff(provider, make_team, make_lease, settings):
    settings.LEASE_TRANSFER_BACKOFF_SECONDS = 60
    old = make_team("old")
    full = make_team("full", capacity=1)
    make_lease(full)
    lease = _due(make_lease, provider, old)
    before = timezone.now()
    assert transfers_run().summary() == {"claimed": 1, "retry": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.TRANSFERRING and lease.attempts == 1
    assert _("no other team of pool %(pool)s has a free seat") % {"pool": "default"} in lease.last_error
    assert before + timedelta(seconds=30) <= lease.next_attempt_at <= before + timedelta(seconds=61)
    assert lease.claimed_until is None
    assert transfers_run().claimed == 0  # not before next_attempt_at
    full.capacity = 2
    full.save()
    result = transfers_run(now=lease.next_attempt_at + timedelta(seconds=1))
    assert result.summary() == {"claimed": 1, "transferred": 1}
    lease.refresh_from_db()
    assert lease.team == full and lease.attempts == 0


def test_backoff_grows_exponentially_with_jitter(settings):
    settings.LEASE_TRANSFER_BACKOFF_SECONDS = 10
    settings.LEASE_TRANSFER_BACKOFF_MAX_SECONDS = 100
    for attempt, full in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (9, 100)]:
        samples = [transfer_backoff_seconds(attempt) for _ in range(50)]
        assert all(full / 2 <= s <= full for s in samples)
        assert len(set(samples)) > 1


def test_transient_failures_then_failed_with_alert(provider, make_team, make_lease, settings, caplog):
    settings.LEASE_TRANSFER_MAX_ATTEMPTS = 3
    old = make_team("old")
    make_team("new")
    lease = _due(make_lease, provider, old)
    # Inviting to the new team works; removing from the old team keeps failing.
    provider.state.team("old").fail_next.extend(TransientProviderError("x", status=503) for _ in range(10))
    now = timezone.now()
    for attempt in (1, 2):
        assert transfers_run(now=now).summary() == {"claimed": 1, "retry": 1}
        lease.refresh_from_db()
        assert lease.attempts == attempt and lease.transfer_step == TransferStep.INVITED
        now = lease.next_attempt_at + timedelta(seconds=1)
    with caplog.at_level(logging.ERROR, logger="leasesite.alerts"):
        assert transfers_run(now=now).summary() == {"claimed": 1, "failed": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.FAILED and lease.attempts == 3 and "503" in lease.last_error
    assert lease.team == old  # still seated in the old team, where it was
    assert provider.state.team("new").invite_posts == [lease.email]  # invited once over three attempts
    assert provider.state.team("new").invited_emails() == set()  # the dangling invite was withdrawn
    assert any(_("Lease transfer failed: %(email)s") % {"email": lease.email} in r.getMessage() for r in caplog.records)
    failed = lease.events.get(action=LeaseAction.TRANSFER_FAILED)
    assert failed.detail["invite_withdrawn"] is True and failed.detail["removed_from_target"] is False
    assert failed.detail["whereabouts_unknown"] == ["old"]  # the old team could not even be listed
    assert lease.events.filter(action=LeaseAction.TRANSFER_RETRY).count() == 2


def test_permanent_error_fails_at_once(provider, make_team, make_lease):
    old = make_team("old")
    make_team("new")
    lease = _due(make_lease, provider, old)
    provider.state.team("new").fail_next.append(PermanentProviderError("x", status=400))
    assert transfers_run().summary() == {"claimed": 1, "failed": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.FAILED and lease.attempts == 1 and "400" in lease.last_error
    assert "new" in lease.last_error and "invite" in lease.last_error  # which team, which call


def test_member_id_unknown_is_looked_up(provider, make_team, make_lease):
    old = make_team("old")
    make_team("new")
    lease = _due(make_lease, provider, old)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id="")
    assert transfers_run().count("transferred") == 1
    assert provider.state.team("old").member_emails() == set()


def test_dry_run_changes_nothing(provider, make_team, make_lease):
    old = make_team("old")
    make_team("new")
    lease = _due(make_lease, provider, old)
    ending = _due(make_lease, provider, old, ends_at=timezone.now())
    calls = provider.state.calls()
    before = list(MemberLease.objects.order_by("pk").values())
    events = LeaseEvent.objects.count()
    preview = transfers_preview()
    assert {(o.lease_id, o.outcome) for o in preview.outcomes} == {
        (lease.pk, "would_transfer"),
        (ending.pk, "would_expire"),
    }
    assert "old -> new" in next(o.detail for o in preview.outcomes if o.lease_id == lease.pk)
    assert list(MemberLease.objects.order_by("pk").values()) == before
    assert LeaseEvent.objects.count() == events
    assert provider.state.calls() == calls


def test_a_claimed_lease_is_not_taken_by_another_run(provider, make_team, make_lease):
    old = make_team("old")
    make_team("new")
    lease = _due(make_lease, provider, old)
    MemberLease.objects.filter(pk=lease.pk).update(
        claimed_until=timezone.now() + timedelta(minutes=5), claimed_by="someone"
    )
    assert transfers_run().claimed == 0
    later = timezone.now() + timedelta(minutes=6)  # the claim lapsed: its owner died
    assert transfers_run(now=later).count("transferred") == 1


# -- real processes ------------------------------------------------------------------------------------
def _subprocess_env(live_server_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(live_server_env)
    env.update(extra)
    return env


@pytest.mark.django_db(transaction=True)
def test_crash_between_invite_and_removal_resumes_without_a_second_invite(
    provider, make_team, make_lease, live_server_env
):
    old, new = make_team("old"), make_team("new")
    lease = _due(make_lease, provider, old)
    provider.state.hold_deletes.set()
    provider.state.discard_held_deletes = True
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_transfers", "--email", lease.email],
        cwd=BASE_DIR,
        env=_subprocess_env(live_server_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert provider.state.delete_arrived.wait(60), proc.stdout.read().decode() if proc.poll() is not None else ""
        os.kill(proc.pid, signal.SIGKILL)  # the worker dies between "invited" and "removed"
        proc.wait(10)
    finally:
        provider.state.hold_deletes.clear()
        if proc.poll() is None:
            proc.kill()
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.TRANSFERRING
    assert lease.transfer_step == TransferStep.INVITED and lease.transfer_team == new
    assert lease.claimed_until is not None  # still claimed by the dead worker
    assert provider.state.team("new").invite_posts == [lease.email]
    assert lease.email in provider.state.team("old").member_emails()

    assert transfers_run().claimed == 0  # the dead worker's claim holds until it lapses
    resumed = transfers_run(now=timezone.now() + timedelta(seconds=django_settings.LEASE_CLAIM_TTL + 1))
    assert resumed.summary() == {"claimed": 1, "transferred": 1}
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.PENDING and lease.team == new
    assert provider.state.team("new").invite_posts == [lease.email]  # never invited twice
    assert lease.email not in provider.state.team("old").member_emails()
    assert _actions(lease) == ["transfer_started", "invited", "left_old_team", "transferred"]


@pytest.mark.django_db(transaction=True)
def test_two_workers_move_each_lease_exactly_once(provider, make_team, make_lease, live_server_env):
    teams = [make_team(f"t{n}", capacity=40) for n in range(4)]
    leases = [_due(make_lease, provider, teams[n % 2]) for n in range(30)]
    old_team = {lease.pk: lease.team_id for lease in leases}
    env = _subprocess_env(live_server_env, LEASE_TRANSFER_CONCURRENCY="3", LEASE_TRANSFER_BATCH_SIZE="4")
    procs = [
        subprocess.Popen(
            [sys.executable, "manage.py", "run_transfers"],
            cwd=BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = []
    deadline = time.monotonic() + 120
    for proc in procs:
        out, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        outputs.append(out.decode())
        assert proc.returncode == 0, out.decode()
    moved_by = [out.count(": transferred") for out in outputs]
    assert sum(moved_by) == 30, outputs
    for lease in leases:
        lease.refresh_from_db()
        assert lease.status == LeaseStatus.PENDING and lease.team_id != old_team[lease.pk]
        assert lease.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
        assert lease.events.filter(action=LeaseAction.TRANSFER_STARTED).count() == 1
        posts = sum(provider.state.team(t.name).invite_posts.count(lease.email) for t in teams)
        assert posts == 1
    for team in teams:
        assert MemberLease.objects.filter(team=team).count() <= team.capacity
