"""Races of the lease engine, with real threads and real processes on the test database.

Each test is the regression test of a defect of the engine before "one writer for a lease"
(commit 74daccf), written through entry points both versions have (``redeem``, ``transfers_run``,
``lease_cancel``, the admin action, the ``run_transfers`` command) so it can be run on the old code
to watch it fail.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.messages import get_messages
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.translation import gettext

from leases.models import LeaseAction, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.services.operator import lease_cancel
from leases.services.redemption import RedemptionError, redeem
from leases.services.transfers import transfers_run
from leasesite.fakes.team_provider_server import FakeProviderServer

BASE_DIR = Path(django_settings.BASE_DIR)
ALREADY_SEATED = "This email already has a seat. Check its status page, or contact support to extend it."


def zh(msgid: str) -> str:
    """What a customer reading zh-hans sees for ``msgid`` (the site's language)."""
    with translation.override("zh-hans"):
        text = gettext(msgid)
    assert text != msgid, f"no zh-hans translation of {msgid!r}"
    return text


def run_in_threads(target, args_list: list[tuple], timeout: float = 60) -> None:
    """Start one thread per argument tuple and wait for all; each thread closes its own
    database connection."""

    def wrapped(*args: object) -> None:
        try:
            target(*args)
        finally:
            connection.close()

    threads = [threading.Thread(target=wrapped, args=args) for args in args_list]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"


def due_lease(make_lease, provider: FakeProviderServer, team: Team, *, overdue: timedelta, **kwargs) -> MemberLease:
    """An active lease seated at the provider whose term ended ``overdue`` ago."""
    now = timezone.now()
    kwargs.setdefault("joined_at", now - timedelta(days=31))
    lease = make_lease(team, LeaseStatus.ACTIVE, expires_at=now - overdue, **kwargs)
    member_id = provider.state.team(team.name).add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    lease.refresh_from_db()
    return lease


def seated_in(provider: FakeProviderServer, team: str, email: str) -> bool:
    fake = provider.state.team(team)
    return email in fake.member_emails() or email in fake.invited_emails()


def actions_of(lease: MemberLease) -> list[str]:
    return [a for a in lease.events.order_by("id").values_list("action", flat=True) if a != LeaseAction.NOTE]


# -- defect 2: one email takes several seats -------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_one_email_redeeming_several_codes_at_once_gets_one_seat(provider, make_team, make_code):
    """Five different codes for one email, redeemed at the same moment (five threads, five
    database connections), with free seats in several teams: one lease, four clear refusals, four
    codes still unused. The old code checked "no open lease" before taking the team locks, so the
    waiting redemptions each opened a lease in another team (2–3 leases on PostgreSQL)."""
    for name in ("alpha", "beta", "gamma"):
        make_team(name, capacity=10)
    codes = [make_code() for _ in range(5)]
    spellings = ["Same@Example.com", "same@example.com", "SAME@EXAMPLE.COM", "same@Example.com", " same@example.com "]
    barrier = threading.Barrier(len(codes))
    outcomes: list[object] = []
    lock = threading.Lock()

    def submit(code: RedemptionCode, email: str) -> None:
        barrier.wait()
        try:
            outcome: object = redeem(code=code.code, email=email).pk
        except RedemptionError as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)

    run_in_threads(submit, list(zip(codes, spellings, strict=True)))

    leases = list(MemberLease.objects.filter(email__iexact="same@example.com"))
    assert len(leases) == 1, [(lease.team.name, lease.status) for lease in leases]
    lease = leases[0]
    assert lease.status == LeaseStatus.PENDING and lease.email == "same@example.com"
    assert outcomes.count(lease.pk) == 1
    refusals = [o for o in outcomes if isinstance(o, Exception)]
    # A redemption that lost the insert race is told the email has a seat; one that came after
    # the winner's commit tries to renew it, which a seat without an end date refuses.
    no_end = zh(
        "This email's seat has no end date (it continues until cancelled), so there is nothing to extend. "
        "The code was not used."
    )
    assert len(refusals) == 4 and {str(e) for e in refusals} <= {zh(ALREADY_SEATED), no_end}, outcomes
    for code in codes:
        code.refresh_from_db()
    used = [code for code in codes if code.lease_id is not None]
    assert [code.lease_id for code in used] == [lease.pk]
    assert all(code.redeemed_at is None and code.lease_id is None for code in codes if code not in used)
    assert lease.events.filter(action=LeaseAction.REDEEMED).count() == 1
    # One invite, to the lease's team.
    posts = {name: provider.state.team(name).invite_posts for name in ("alpha", "beta", "gamma")}
    assert posts == {name: (["same@example.com"] if name == lease.team.name else []) for name in posts}


@pytest.mark.django_db
def test_the_database_refuses_a_second_open_lease_of_an_email_in_another_team(provider, make_team, make_lease):
    """Whatever race the code above loses, the database stores one open lease per lower-cased email
    (the old code's index was per team, so another team took a second one)."""
    alpha, beta = make_team("alpha"), make_team("beta")
    make_lease(alpha, LeaseStatus.ACTIVE, email="Twice@Example.com")
    with pytest.raises(IntegrityError), transaction.atomic():
        MemberLease.objects.create(email="twice@example.com", team=beta, term_months=1, status=LeaseStatus.PENDING)
    assert MemberLease.objects.filter(email__iexact="twice@example.com").count() == 1


# -- defect 7: cancel during a transfer --------------------------------------------------------------------
def _cancel_through_the_service(lease: MemberLease, admin_user) -> str:
    outcome = lease_cancel(lease_id=lease.pk, actor_id=admin_user.pk, reason="customer asked")
    return "requested" if not getattr(outcome, "cancelled", True) else "cancelled"


def _cancel_through_the_admin(lease: MemberLease, admin_user) -> str:
    client = Client()
    client.force_login(admin_user)
    response = client.post(
        reverse("admin:leases_memberlease_changelist"),
        {"action": "cancel_leases", "_selected_action": [lease.pk], "confirmed": "yes"},
    )
    assert response.status_code == 302
    texts = [str(m) for m in get_messages(response.wsgi_request)]
    with translation.override("zh-hans"):
        busy = gettext(
            "Lease(s) %(ids)s are being worked on right now (a transfer or an invite): they will be "
            "cancelled as soon as its current step ends."
        ) % {"ids": str(lease.pk)}
    return "requested" if busy in texts else "cancelled"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("cancel", [_cancel_through_the_service, _cancel_through_the_admin], ids=["service", "admin"])
def test_cancel_while_a_worker_is_inside_the_invite_call(
    provider, make_team, make_lease, admin_user, settings, cancel, eager_tasks
):
    """An operator cancels a lease while the transfer executor waits for the provider to answer
    its invite into the next team. The worker holds the lease, so the cancel is left as a request;
    the worker honours it before its next provider call: the lease ends cancelled, the customer is
    neither in the old team nor invited to the new one, and the run goes on with the other leases.

    The old code cancelled under the worker, whose next write then broke the transfer-fields
    constraint: the IntegrityError ended the whole run (the other leases' outcomes were lost) and
    the customer kept a live invite to the new team."""
    settings.LEASE_TRANSFER_CONCURRENCY = 1  # one lease after the other: the victim goes first
    settings.LEASE_PROVIDER_TIMEOUT = 30  # the held invite must not time out
    old, new = make_team("old", capacity=10), make_team("new", capacity=10)
    victim = due_lease(make_lease, provider, old, overdue=timedelta(minutes=3), email="victim@example.com")
    others = [due_lease(make_lease, provider, old, overdue=timedelta(minutes=2 - n)) for n in range(2)]
    provider.state.hold_invites.set()
    said: list[str] = []
    errors: list[BaseException] = []

    def operator() -> None:
        try:
            assert provider.state.invite_arrived.wait(30), "the worker never reached the invite"
            said.append(cancel(victim, admin_user))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            provider.state.hold_invites.clear()

    thread = threading.Thread(target=lambda: (operator(), connection.close()))
    thread.start()
    try:
        result = transfers_run()  # nothing may escape it
    finally:
        provider.state.hold_invites.clear()
        thread.join(30)
    assert not errors, errors
    assert said == ["requested"]  # the worker held the lease when the operator acted

    assert result.summary() == {"claimed": 3, "transferred": 2, "cancelled": 1}
    for lease in others:
        lease.refresh_from_db()
        assert (lease.status, lease.team) == (LeaseStatus.PENDING, new)
        assert seated_in(provider, "new", lease.email) and not seated_in(provider, "old", lease.email)

    victim.refresh_from_db()
    assert victim.status == LeaseStatus.CANCELLED
    assert (victim.claimed_by, victim.claimed_until, victim.cancel_requested_at) == ("", None, None)
    assert not seated_in(provider, "old", victim.email)
    assert not seated_in(provider, "new", victim.email)  # the invite sent meanwhile was withdrawn
    assert provider.state.team("new").invite_posts.count(victim.email) == 1
    actions = actions_of(victim)
    assert actions.index(LeaseAction.CANCEL_REQUESTED) < actions.index(LeaseAction.CANCELLED), actions
    assert LeaseAction.TRANSFERRED not in actions
    cancelled = victim.events.get(action=LeaseAction.CANCELLED)
    assert (cancelled.from_status, cancelled.to_status, cancelled.actor) == (
        LeaseStatus.TRANSFERRING,
        LeaseStatus.CANCELLED,
        admin_user,
    )
    freed = victim.events.filter(action=LeaseAction.LEFT_OLD_TEAM, created_at__gte=cancelled.created_at)
    assert sorted(e.detail["team"] for e in freed) == ["new", "old"]


@pytest.mark.django_db(transaction=True)
def test_cancel_while_the_redemption_invite_is_on_its_way(provider, make_team, make_code, settings):
    """The same race outside a transfer: an operator cancels a fresh lease while the invite sent
    after its redemption waits for the provider. The invite must not outlive the cancel (found
    while writing the test above: ``lease_invite`` called the provider without claiming the
    lease, so the cancel freed the seat before the invite landed, and the invite stayed)."""
    settings.LEASE_PROVIDER_TIMEOUT = 30  # the held invite must not time out
    make_team("alpha", capacity=10)
    code = make_code()
    provider.state.hold_invites.set()
    redeemed: list[object] = []

    def customer() -> None:
        try:
            redeemed.append(redeem(code=code.code, email="quick@example.com"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            redeemed.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=customer)
    thread.start()
    try:
        assert provider.state.invite_arrived.wait(30), "the redemption never reached the invite"
        lease = MemberLease.objects.get(email="quick@example.com")
        lease_cancel(lease_id=lease.pk, reason="customer asked")
    finally:
        provider.state.hold_invites.clear()
        thread.join(30)
    assert len(redeemed) == 1 and isinstance(redeemed[0], MemberLease), redeemed

    lease.refresh_from_db()
    assert lease.status == LeaseStatus.CANCELLED
    assert provider.state.team("alpha").invite_posts == ["quick@example.com"]
    assert not seated_in(provider, "alpha", "quick@example.com")  # no invite left behind
    assert (lease.claimed_by, lease.claimed_until, lease.cancel_requested_at) == ("", None, None)
    actions = actions_of(lease)
    assert actions[0] == LeaseAction.REDEEMED and actions[-2:] == [LeaseAction.CANCELLED, LeaseAction.LEFT_OLD_TEAM]


# -- defect 8: transfer claims are never renewed or re-checked ----------------------------------------------
def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _run_transfers(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_transfers"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _removals(provider: FakeProviderServer, team: str, lease: MemberLease) -> int:
    paths = {f"members/{lease.provider_member_id}", f"invites/{lease.email}"}
    with provider.state._lock:
        return sum(1 for t, m, p in provider.state.requests if t == team and m == "DELETE" and p in paths)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("concurrency", [1, 4], ids=["inline", "threads"])
def test_a_batch_slower_than_the_claim_ttl_is_not_taken_over(
    provider, make_team, make_lease, live_server_env, concurrency
):
    """Worker A claims 8 leases and then waits on the provider (its invites are held) for longer
    than LEASE_CLAIM_TTL; worker B starts after the TTL. A keeps its claims alive, so B finds
    nothing to do and every lease moves exactly once: one invite to the next team, one removal
    from the old one, one ``transferred`` event. The old code never renewed a claim and never
    re-checked it, so B took the leases over and both workers invited and removed the same people
    (14 invites and 15 removals for 8 leases)."""
    ttl = 10  # the smallest LEASE_CLAIM_TTL the settings accept
    olds = [make_team("old0", capacity=4), make_team("old1", capacity=4)]  # full: the leases go to new*
    news = [make_team("new0", capacity=10), make_team("new1", capacity=10)]
    leases = [due_lease(make_lease, provider, olds[n % 2], overdue=timedelta(minutes=10 - n)) for n in range(8)]
    env = dict(live_server_env)
    env.update(
        LEASE_CLAIM_TTL=str(ttl),
        LEASE_TRANSFER_CONCURRENCY=str(concurrency),
        LEASE_TRANSFER_BATCH_SIZE="8",
        LEASE_PROVIDER_TIMEOUT="60",  # the held invites must not time out
    )
    provider.state.hold_invites.set()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_run_transfers(env))
        assert provider.state.invite_arrived.wait(60), "worker A never reached an invite"
        owners = set(MemberLease.objects.values_list("claimed_by", flat=True))
        assert len(owners) == 1 and "" not in owners, owners  # A holds the whole batch
        first_deadline: datetime = max(MemberLease.objects.values_list("claimed_until", flat=True))
        # Let the claims A took lapse, had A not renewed them.
        time.sleep(max(0.0, (first_deadline - timezone.now()).total_seconds()) + 1)
        procs.append(_run_transfers(env))

        def b_is_done_or_took_leases() -> bool:
            return procs[1].poll() is not None or MemberLease.objects.exclude(claimed_by__in=[*owners, ""]).exists()

        _wait_for(b_is_done_or_took_leases, 60, "worker B to finish or claim")
        time.sleep(1 if procs[1].poll() is None else 0)  # B took leases: let it reach its invites too
    finally:
        provider.state.hold_invites.clear()
        outputs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            outputs.append(out.decode())

    invites = {
        lease.email: sum(provider.state.team(t.name).invite_posts.count(lease.email) for t in news) for lease in leases
    }
    removals = {lease.email: sum(_removals(provider, t.name, lease) for t in olds) for lease in leases}
    assert invites == {lease.email: 1 for lease in leases}, (invites, outputs)
    assert removals == {lease.email: 1 for lease in leases}, (removals, outputs)
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    for lease in leases:
        old_team = lease.team
        lease.refresh_from_db()
        assert lease.status == LeaseStatus.PENDING and lease.team in news
        assert seated_in(provider, lease.team.name, lease.email) and not seated_in(provider, old_team.name, lease.email)
        assert lease.events.filter(action=LeaseAction.TRANSFERRED).count() == 1
        assert lease.events.filter(action=LeaseAction.LEFT_OLD_TEAM).count() == 1
    assert sum(out.count(": transferred") for out in outputs) == 8, outputs
