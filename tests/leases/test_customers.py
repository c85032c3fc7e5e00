"""Customers: the waiting list, renewals, the self-service lookup, pools and the low-seat alert."""

from __future__ import annotations

import logging
import secrets
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import TestCase
from django.urls import reverse
from django.utils import timezone, translation

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, RedemptionCode
from leases.services.cancellation import lease_cancel
from leases.services.lowseats import lowseats_check
from leases.services.redemption import RedemptionError, codes_generate, redeem
from leases.services.sync import joins_sync
from leases.services.transfers import transfers_run
from leases.services.transitions import LeaseError
from leases.services.waiting import waiting_drain, waiting_position
from leasesite.models import AlertState

pytestmark = pytest.mark.django_db


def full_team(make_team, make_lease, name="alpha", capacity=1, **kwargs):
    team = make_team(name, capacity=capacity, **kwargs)
    for _ in range(capacity):
        make_lease(team, LeaseStatus.ACTIVE)
    return team


# -- waiting list -------------------------------------------------------------------------------------
def test_a_full_pool_queues_redemptions_first_come_first_served(
    provider, make_team, make_lease, make_code, eager_tasks
):
    team = full_team(make_team, make_lease, capacity=2)
    first = redeem(code=make_code().code, email="first@example.com")
    second = redeem(code=make_code().code, email="second@example.com")
    assert [first.status, second.status] == [LeaseStatus.WAITING, LeaseStatus.WAITING]
    assert [waiting_position(first), waiting_position(second)] == [1, 2]

    seated_one = MemberLease.objects.filter(team=team, status=LeaseStatus.ACTIVE).first()
    with TestCase.captureOnCommitCallbacks(execute=True):
        lease_cancel(lease_id=seated_one.pk, reason="customer left")  # frees a seat, the queue drains

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.team) == (LeaseStatus.PENDING, team)
    assert first.invited_at is not None  # invited by the task sent after the commit
    assert provider.state.team("alpha").invited_emails() >= {"first@example.com"}
    assert first.events.filter(action=LeaseAction.SEATED, from_status="waiting", to_status="pending").exists()
    assert (second.status, waiting_position(second)) == (LeaseStatus.WAITING, 1)


def test_a_join_sync_drains_the_queue_when_the_provider_shows_seats_freed(provider, make_team, make_code):
    team = make_team("alpha", capacity=2)
    team.members_seen = 2  # people we do not lease fill it
    team.save()
    waiting = redeem(code=make_code().code, email="w@example.com")
    assert waiting.status == LeaseStatus.WAITING
    with TestCase.captureOnCommitCallbacks(execute=False):
        joins_sync()  # the provider now shows nobody: two seats
    waiting.refresh_from_db()
    assert (waiting.status, waiting.team) == (LeaseStatus.PENDING, team)


def test_an_expiry_in_a_transfer_run_seats_the_next_waiting_lease(provider, make_team, make_lease, make_code):
    team = make_team("alpha", capacity=1)
    now = timezone.now()
    ending = make_lease(
        team, LeaseStatus.ACTIVE, expires_at=now - timedelta(minutes=5), ends_at=now - timedelta(minutes=5)
    )
    provider.state.team("alpha").add_member(ending.email)
    waiting = redeem(code=make_code().code, email="w@example.com")
    assert waiting.status == LeaseStatus.WAITING
    with TestCase.captureOnCommitCallbacks(execute=False):
        transfers_run()
    ending.refresh_from_db()
    waiting.refresh_from_db()
    assert ending.status == LeaseStatus.EXPIRED
    assert (waiting.status, waiting.team) == (LeaseStatus.PENDING, team)


def test_an_operator_cancels_a_waiting_lease_and_its_code_stays_redeemed_with_history(
    provider, make_team, make_lease, make_code
):
    full_team(make_team, make_lease)
    code = make_code()
    lease = redeem(code=code.code, email="w@example.com")
    outcome = lease_cancel(lease_id=lease.pk, reason="refund")
    lease.refresh_from_db()
    code.refresh_from_db()
    assert outcome.cancelled and lease.status == LeaseStatus.CANCELLED and lease.team is None
    assert (code.redeemed_at is not None, code.lease_id) == (True, lease.pk)
    assert [e.action for e in lease.events.order_by("id")] == [LeaseAction.WAITING, LeaseAction.CANCELLED]
    assert provider.state.calls() == 0


def test_a_drain_never_overfills_a_team_and_keeps_the_order(provider, make_team, make_lease, make_code):
    team = full_team(make_team, make_lease, capacity=2)
    queued = [redeem(code=make_code().code, email=f"q{n}@example.com") for n in range(4)]
    team.capacity = 4  # two more seats
    team.save()
    with TestCase.captureOnCommitCallbacks(execute=False):
        seated = waiting_drain()
    assert [s.lease_id for s in seated] == [queued[0].pk, queued[1].pk]
    statuses = [MemberLease.objects.get(pk=lease.pk).status for lease in queued]
    assert statuses == [LeaseStatus.PENDING, LeaseStatus.PENDING, LeaseStatus.WAITING, LeaseStatus.WAITING]


@pytest.mark.django_db(transaction=True)
def test_two_drains_at_once_seat_each_lease_once(provider, make_team, make_lease, make_code):
    """Two workers drain the same queue at the same moment (threads, own connections): every
    free seat is taken once, no lease is seated twice, no team goes over capacity."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks are PostgreSQL's; SQLite serializes writers anyway")
    teams = [full_team(make_team, make_lease, name=f"t{n}", capacity=1) for n in range(3)]
    queued = [redeem(code=make_code().code, email=f"race{n}@example.com") for n in range(8)]
    for team in teams:
        team.capacity = 3  # two free seats each: six of the eight get one
        team.save()
    barrier = threading.Barrier(2)
    results: list = []

    def drain() -> None:
        barrier.wait()
        try:
            results.append(waiting_drain())
        finally:
            connection.close()

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    seated_ids = [s.lease_id for batch in results for s in batch]
    assert len(seated_ids) == len(set(seated_ids)) == 6
    assert set(seated_ids) == {lease.pk for lease in queued[:6]}  # first come, first served
    for team in teams:
        held = MemberLease.objects.filter(team=team, status__in=[LeaseStatus.ACTIVE, LeaseStatus.PENDING]).count()
        assert held == 3
    assert LeaseEvent.objects.filter(action=LeaseAction.SEATED).count() == 6


# -- renewals -------------------------------------------------------------------------------------------
def test_a_second_code_renews_the_open_lease(provider, make_team, make_lease, make_code):
    team = make_team("alpha")
    ends = datetime(2027, 1, 31, 12, tzinfo=UTC)
    lease = make_lease(team, LeaseStatus.ACTIVE, email="buyer@example.com", total_months=3, ends_at=ends)
    code = make_code(term_months=1, total_months=2)
    renewed = redeem(code=code.code, email="Buyer@Example.com")
    assert renewed.pk == lease.pk
    assert renewed.ends_at == datetime(2027, 3, 31, 12, tzinfo=UTC)  # calendar months, from the old end
    assert renewed.total_months == 5
    event = renewed.events.get(action=LeaseAction.RENEWED)
    assert (event.detail["months"], event.detail["code"]) == (2, code.code)
    code.refresh_from_db()
    assert code.lease_id == lease.pk and code.redeemed_at is not None
    assert MemberLease.objects.filter(email="buyer@example.com").count() == 1
    # A term-only code adds its term; a month end clamps (March 31 + 1 → April 30).
    again = redeem(code=make_code(term_months=1).code, email="buyer@example.com")
    assert again.ends_at == datetime(2027, 4, 30, 12, tzinfo=UTC)
    assert lease.redemption_codes.order_by("id").values_list("code", flat=True).first() == code.code


def test_a_renewal_before_the_first_join_grows_the_entitlement(provider, make_team, make_lease, make_code):
    make_lease(make_team("alpha"), LeaseStatus.PENDING, email="p@example.com", total_months=1)
    renewed = redeem(code=make_code(term_months=1, total_months=3).code, email="p@example.com")
    assert (renewed.total_months, renewed.ends_at) == (4, None)  # counted from the first join


def test_a_waiting_lease_can_be_renewed(provider, make_team, make_lease, make_code):
    full_team(make_team, make_lease)
    waiting = redeem(code=make_code(term_months=1, total_months=1).code, email="w@example.com")
    renewed = redeem(code=make_code(term_months=1, total_months=2).code, email="w@example.com")
    assert (renewed.pk, renewed.status, renewed.total_months) == (waiting.pk, LeaseStatus.WAITING, 3)


def test_a_renewal_is_refused_for_a_rotating_lease_and_across_pools(provider, make_team, make_lease, make_code):
    team = make_team("alpha")
    make_lease(team, LeaseStatus.ACTIVE, email="rot@example.com")  # no entitlement end
    code = make_code(term_months=1, total_months=2)
    with translation.override("en"), pytest.raises(RedemptionError, match="no end date"):
        redeem(code=code.code, email="rot@example.com")
    make_lease(team, LeaseStatus.ACTIVE, email="fixed@example.com", total_months=2, ends_at=timezone.now())
    vip = RedemptionCode.objects.create(code="VIPP-VIPP-VIPP-VIPP", term_months=1, total_months=1, pool="vip")
    with translation.override("en"), pytest.raises(RedemptionError, match="another kind of seat"):
        redeem(code=vip.code, email="fixed@example.com")
    for unused in (code, vip):
        unused.refresh_from_db()
        assert unused.redeemed_at is None and unused.lease_id is None


def test_an_expired_lease_within_the_grace_period_reopens_in_its_last_team(
    provider, make_team, make_lease, make_code, settings
):
    settings.LEASE_RENEWAL_GRACE_DAYS = 7
    make_team("roomy", capacity=50)
    old_team = make_team("old", capacity=5)
    now = timezone.now()
    old = make_lease(old_team, LeaseStatus.ACTIVE, email="back@example.com")
    MemberLease.objects.filter(pk=old.pk).update(status=LeaseStatus.EXPIRED, ends_at=now - timedelta(days=2))
    fresh = redeem(code=make_code().code, email="back@example.com")
    assert fresh.pk != old.pk and fresh.status == LeaseStatus.PENDING
    assert fresh.team == old_team  # not the roomiest team: the one it was in
    assert fresh.events.get(action=LeaseAction.REDEEMED).detail["reopens"] == old.pk

    settings.LEASE_RENEWAL_GRACE_DAYS = 1  # long ago: a plain new redemption
    lease_cancel(lease_id=fresh.pk)
    later = redeem(code=make_code().code, email="back@example.com")
    assert later.team.name == "roomy" and "reopens" not in later.events.get(action=LeaseAction.REDEEMED).detail


# -- pools ------------------------------------------------------------------------------------------------
def test_codes_are_generated_per_pool_and_redemptions_stay_inside_it(provider, make_team, make_lease):
    full_team(make_team, make_lease, name="default-team")
    vip_team = make_team("vip-team", capacity=5, pool="vip")
    (vip_code,) = codes_generate(count=1, term_months=1, pool="vip")
    (plain_code,) = codes_generate(count=1, term_months=1)
    assert RedemptionCode.objects.get(code=vip_code).pool == "vip"
    assert redeem(code=vip_code, email="v@example.com").team == vip_team
    waiting = redeem(code=plain_code, email="d@example.com")
    assert (waiting.status, waiting.pool) == (LeaseStatus.WAITING, "default")  # the vip seats are not its
    with TestCase.captureOnCommitCallbacks(execute=False):
        assert waiting_drain() == []
    with translation.override("en"), pytest.raises(LeaseError, match="A pool is a short label"):
        codes_generate(count=1, term_months=1, pool="no spaces allowed")


# -- the self-service lookup --------------------------------------------------------------------------
@pytest.fixture
def address() -> str:
    return f"10.77.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def test_the_lookup_finds_the_lease_by_code_and_email_and_says_nothing_more_when_wrong(
    client, address, provider, make_team, make_code
):
    make_team("alpha")
    code = make_code()
    lease = redeem(code=code.code, email="me@example.com")
    url = reverse("leases:lookup")
    assert 'name="code"' in client.get(url).content.decode()
    found = client.post(url, {"code": code.code.lower(), "email": "ME@example.com"}, REMOTE_ADDR=address)
    assert found.status_code == 302 and found["Location"] == reverse("leases:status", args=[lease.public_id])
    answers = [
        client.post(url, {"code": code.code, "email": "other@example.com"}, REMOTE_ADDR=address),
        client.post(url, {"code": "NOPE-NOPE-NOPE-NOPE", "email": "me@example.com"}, REMOTE_ADDR=address),
        client.post(url, {"code": make_code().code, "email": "me@example.com"}, REMOTE_ADDR=address),  # unused
    ]
    assert [a.status_code for a in answers] == [400, 400, 400]
    bodies = {a.content.decode().split('role="alert">')[1].split("</div>")[0] for a in answers}
    assert len(bodies) == 1  # the same words whichever half was wrong
    assert "没有与此兑换码和邮箱相符的席位" in bodies.pop()
    assert str(lease.public_id) not in "".join(a.content.decode() for a in answers)


def test_the_lookup_is_csrf_protected_and_rate_limited(address, settings, make_code):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    assert strict.post(reverse("leases:lookup"), {"code": "X", "email": "a@example.com"}).status_code == 403
    settings.LEASE_REDEEM_RATE_LIMIT = 2
    client = Client()
    codes = [
        client.post(reverse("leases:lookup"), {"code": "X", "email": "a@example.com"}, REMOTE_ADDR=address)
        for _ in range(3)
    ]
    assert [r.status_code for r in codes] == [400, 400, 429]


def test_the_status_page_speaks_to_customers(client, provider, make_team, make_lease, make_code):
    team = make_team("alpha")
    failed = make_lease(team, LeaseStatus.FAILED, last_error="POST invites: HTTP 500 at team beta")
    body = client.get(reverse("leases:status", args=[failed.public_id])).content.decode()
    assert "正在处理" in body and "HTTP 500" not in body and "beta" not in body
    pending = make_lease(team, LeaseStatus.PENDING, total_months=6)
    body = client.get(reverse("leases:status", args=[pending.public_id])).content.decode()
    assert "等待接受邀请" in body and "首次加入后 6 个月" in body


# -- the low-seat alert ------------------------------------------------------------------------------------
def test_low_seats_alert_once_per_change_and_resolve(provider, make_team, make_lease, make_code, settings, caplog):
    settings.LEASE_LOW_SEATS = 2
    team = make_team("alpha", capacity=3)
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        assert lowseats_check(pool="default") == "ok"  # three free
        make_lease(team, LeaseStatus.ACTIVE)
        make_lease(team, LeaseStatus.ACTIVE)
        assert lowseats_check(pool="default") == "alerted"  # one free < 2
        assert lowseats_check(pool="default") == "unchanged"
        make_lease(team, LeaseStatus.ACTIVE)
        with TestCase.captureOnCommitCallbacks(execute=True):
            redeem(code=make_code().code, email="w1@example.com")  # queued: the waiting list grows
        with TestCase.captureOnCommitCallbacks(execute=True):
            redeem(code=make_code().code, email="w2@example.com")
        assert lowseats_check(pool="default") == "unchanged"
        alerts = [r.getMessage() for r in caplog.records if "default" in r.getMessage()]
        assert len(alerts) == 3, alerts  # low, then queue of 1, then queue of 2
        team.capacity = 20
        team.save()
        with TestCase.captureOnCommitCallbacks(execute=False):
            waiting_drain()
        assert lowseats_check(pool="default") == "resolved"
    assert not AlertState.objects.get(key="leases:low_seats:default").active
