from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone, translation

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, RedemptionCode
from leases.services.redemption import (
    CodeAlreadyUsedError,
    RedemptionError,
    code_normalize,
    codes_export_csv,
    codes_generate,
    redeem,
)
from leases.services.transitions import LeaseError

pytestmark = pytest.mark.django_db


def test_redeem_creates_a_pending_lease_and_invites(provider, make_team, make_code):
    team = make_team("alpha")
    code = make_code(term_months=2, total_months=6)
    before = timezone.now()
    lease = redeem(code=code.code, email="  Alice@Example.COM ")
    assert lease.status == LeaseStatus.PENDING
    assert lease.email == "alice@example.com"
    assert lease.team == team
    assert (lease.term_months, lease.total_months) == (2, 6)
    assert before <= lease.created_at <= lease.invited_at
    assert lease.joined_at is None and lease.expires_at is None
    code.refresh_from_db()
    assert code.lease == lease and code.redeemed_at == lease.created_at
    assert provider.state.team("alpha").invited_emails() == {"alice@example.com"}
    actions = list(lease.events.values_list("action", "to_status"))
    assert actions == [(LeaseAction.REDEEMED, "pending"), (LeaseAction.INVITED, "pending")]


def test_codes_match_case_insensitively_and_without_dashes(provider, make_team):
    make_team("alpha")
    [code] = codes_generate(count=1, term_months=1)
    assert code_normalize(code.lower().replace("-", " ")) == code
    lease = redeem(code=code.lower().replace("-", ""), email="b@example.com")
    assert lease.redemption_codes.get().code == code


def test_a_used_code_is_refused_and_nothing_changes(provider, make_team, make_code):
    make_team("alpha")
    code = make_code()
    first = redeem(code=code.code, email="a@example.com")
    with pytest.raises(CodeAlreadyUsedError):
        redeem(code=code.code, email="other@example.com")
    assert MemberLease.objects.count() == 1
    code.refresh_from_db()
    assert code.lease == first


def test_same_email_submitting_again_gets_the_same_lease(provider, make_team, make_code):
    make_team("alpha")
    code = make_code()
    first = redeem(code=code.code, email="a@example.com")
    again = redeem(code=code.code.lower(), email="A@example.com")
    assert again.pk == first.pk
    assert MemberLease.objects.count() == 1
    assert provider.state.team("alpha").invite_posts == ["a@example.com"]


@pytest.mark.parametrize(
    ("code", "email", "message"),
    [
        ("NOPE-NOPE", "a@example.com", "does not exist"),
        ("", "a@example.com", "Enter a redemption code"),
        ("X", "not-an-email", "valid email"),
    ],
)
def test_bad_input_is_refused(provider, make_team, code, email, message):
    make_team("alpha")
    with translation.override("en"), pytest.raises(RedemptionError, match=message):
        redeem(code=code, email=email)
    assert MemberLease.objects.count() == 0


def test_no_free_seat_queues_the_lease_on_the_waiting_list(provider, make_team, make_code, make_lease):
    team = make_team("alpha", capacity=1)
    make_lease(team)  # a pending invite holds the only seat
    code = make_code()
    lease = redeem(code=code.code, email="late@example.com")
    assert (lease.status, lease.team_id, lease.invited_at, lease.pool) == (LeaseStatus.WAITING, None, None, "default")
    code.refresh_from_db()
    assert code.redeemed_at is not None and code.lease_id == lease.pk
    assert lease.events.get().action == LeaseAction.WAITING
    assert provider.state.calls() == 0  # nobody was invited


def test_seats_seen_at_the_provider_count_too(provider, make_team, make_code):
    team = make_team("alpha", capacity=3)
    team.members_seen, team.invites_seen = 2, 1  # people we do not lease
    team.save()
    assert redeem(code=make_code().code, email="x@example.com").status == LeaseStatus.WAITING


def test_email_with_an_open_lease_without_an_end_refuses_the_renewal(provider, make_team, make_code, make_lease):
    team = make_team("alpha")
    make_lease(team, LeaseStatus.ACTIVE, email="busy@example.com")  # no entitlement end: rotates until cancelled
    code = make_code()
    with translation.override("en"), pytest.raises(RedemptionError, match="no end date"):
        redeem(code=code.code, email="busy@example.com")
    assert MemberLease.objects.filter(email="busy@example.com").count() == 1
    code.refresh_from_db()
    assert code.redeemed_at is None


def test_team_choice_prefers_covering_the_term_then_most_free_seats(provider, make_team, make_code, make_lease):
    now = timezone.now()
    short = make_team("short", capacity=50, expires_at=now + timedelta(days=20))
    roomy = make_team("roomy", capacity=10)
    tight = make_team("tight", capacity=10)
    make_lease(roomy)
    for _ in range(5):
        make_lease(tight)
    make_team("inactive", capacity=100, is_active=False)
    make_team("ended", capacity=100, expires_at=now - timedelta(days=1))
    lease = redeem(code=make_code(term_months=1).code, email="c@example.com")
    assert lease.team == roomy  # "short" has most seats but ends before the term would
    roomy.is_active = False
    roomy.save()
    lease = redeem(code=make_code(term_months=1).code, email="d@example.com")
    assert lease.team == tight
    tight.capacity = 7
    tight.save()
    lease = redeem(code=make_code(term_months=1).code, email="e@example.com")
    assert lease.team == tight  # still fits one more
    lease = redeem(code=make_code(term_months=1).code, email="f@example.com")
    assert lease.team == short  # nothing else left: a short team beats no seat


def test_invite_failure_is_recorded_and_left_for_the_sync(provider, make_team, make_code):
    from leases.providers import TransientProviderError

    make_team("alpha")
    provider.state.team("alpha").fail_next.append(TransientProviderError("down", status=503))
    lease = redeem(code=make_code().code, email="g@example.com")
    assert lease.status == LeaseStatus.PENDING and lease.invited_at is None
    assert "503" in lease.last_error
    assert lease.events.filter(action=LeaseAction.INVITE_FAILED).exists()


def test_generate_and_export(make_team):
    codes = codes_generate(count=25, term_months=1, total_months=12, batch="promo")
    assert len(set(codes)) == 25
    assert RedemptionCode.objects.filter(batch="promo").count() == 25
    text = codes_export_csv(RedemptionCode.objects.filter(batch="promo").select_related("lease"))
    lines = text.strip().splitlines()
    assert lines[0].startswith("code,term_months,total_months,batch")
    assert len(lines) == 26 and all(",1,12,promo," in line for line in lines[1:])
    with pytest.raises(LeaseError):
        codes_generate(count=0, term_months=1)
    with pytest.raises(LeaseError):
        codes_generate(count=1, term_months=3, total_months=2)
    assert RedemptionCode.objects.count() == 25


@pytest.mark.django_db(transaction=True)
def test_double_submit_at_the_same_moment_makes_one_lease(provider, make_team, make_code):
    """Two requests with the same code race (two threads, two database connections)."""
    make_team("alpha", capacity=10)
    make_team("beta", capacity=10)
    code = make_code()
    barrier = threading.Barrier(4)
    outcomes: list[object] = []
    lock = threading.Lock()

    def submit(email: str) -> None:
        barrier.wait()
        try:
            result: object = redeem(code=code.code, email=email).pk
        except RedemptionError as exc:
            result = type(exc).__name__
        finally:
            connection.close()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=submit, args=(email,)) for email in ["a@x.io", "a@x.io", "b@x.io", "c@x.io"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert MemberLease.objects.count() == 1
    lease = MemberLease.objects.get()
    assert LeaseEvent.objects.filter(action=LeaseAction.REDEEMED).count() == 1
    code.refresh_from_db()
    assert code.lease_id == lease.pk
    winners = [o for o in outcomes if o == lease.pk]
    assert len(outcomes) == 4
    assert all(o == lease.pk or o == "CodeAlreadyUsedError" for o in outcomes)
    assert len(winners) == (2 if lease.email == "a@x.io" else 1)
    total_posts = sum(len(provider.state.team(n).invite_posts) for n in ("alpha", "beta"))
    assert total_posts == 1
