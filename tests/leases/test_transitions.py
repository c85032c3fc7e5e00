from __future__ import annotations

from datetime import timedelta
from itertools import product

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from leases.models import (
    ALLOWED_TRANSITIONS,
    LeaseAction,
    LeaseEvent,
    LeaseStatus,
    MemberLease,
    RedemptionCode,
    Team,
    TransferStep,
)
from leases.services.transitions import (
    IllegalTransitionError,
    StaleLease,
    lease_claim,
    lease_step,
    lease_transition,
    leases_transition,
)

pytestmark = pytest.mark.django_db

# DESIGN §5's diagram, written out independently of the model's table.
EXPECTED_ALLOWED = {
    ("waiting", "pending"),  # a seat freed: seated and invited (DESIGN §5)
    ("waiting", "cancelled"),
    ("pending", "active"),
    ("pending", "cancelled"),
    ("pending", "transferring"),  # evacuation of a dead team (DESIGN §4)
    ("active", "transferring"),
    ("active", "expired"),
    ("active", "cancelled"),
    ("active", "failed"),
    ("transferring", "pending"),
    ("transferring", "expired"),
    ("transferring", "failed"),
    ("transferring", "cancelled"),
    ("failed", "active"),
    ("failed", "transferring"),
    ("failed", "cancelled"),
}
ALL = [s.value for s in LeaseStatus]


@pytest.fixture
def team() -> Team:
    return Team.objects.create(name="t1", provider="memory", capacity=5)


@pytest.fixture
def other_team() -> Team:
    return Team.objects.create(name="t2", provider="memory", capacity=5)


def _changes_for(to_status: str, other: Team) -> dict:
    now = timezone.now()
    if to_status == LeaseStatus.ACTIVE:
        return {"joined_at": now, "expires_at": now + timedelta(days=30)}
    if to_status == LeaseStatus.TRANSFERRING:
        return {"transfer_team": other}
    if to_status == LeaseStatus.PENDING:
        # A pending lease has not joined, and has a team (constraints).
        return {"joined_at": None, "expires_at": None, "team": other}
    return {}


def test_the_table_is_the_design():
    table = {(a, b) for a, targets in ALLOWED_TRANSITIONS.items() for b in targets}
    assert table == EXPECTED_ALLOWED
    assert set(ALLOWED_TRANSITIONS) == set(ALL)


@pytest.mark.parametrize(("from_status", "to_status"), [p for p in product(ALL, ALL) if p[0] != p[1]])
def test_every_pair(make_lease, team, other_team, from_status, to_status):
    moving = {"transfer_team": other_team} if from_status == LeaseStatus.TRANSFERRING else {}
    lease = make_lease(team, from_status, **moving)
    events_before = LeaseEvent.objects.filter(lease=lease).count()
    before = MemberLease.objects.values().get(pk=lease.pk)
    if (from_status, to_status) in EXPECTED_ALLOWED:
        moved, changed = lease_transition(
            lease_id=lease.pk,
            to_status=to_status,
            action=LeaseAction.NOTE,
            changes=_changes_for(to_status, other_team),
        )
        assert changed is True
        assert MemberLease.objects.get(pk=lease.pk).status == to_status
        event = LeaseEvent.objects.filter(lease=lease).latest("id")
        assert (event.from_status, event.to_status) == (from_status, to_status)
        assert LeaseEvent.objects.filter(lease=lease).count() == events_before + 1
        if to_status != LeaseStatus.TRANSFERRING:
            assert moved.transfer_team_id is None  # transfer bookkeeping cleared on the way out
    else:
        with pytest.raises(IllegalTransitionError) as excinfo:
            lease_transition(lease_id=lease.pk, to_status=to_status, action=LeaseAction.NOTE)
        assert excinfo.value.from_status == from_status
        assert str(lease.pk) in str(excinfo.value)
        assert MemberLease.objects.values().get(pk=lease.pk) == before
        assert LeaseEvent.objects.filter(lease=lease).count() == events_before


@pytest.mark.parametrize("status", ALL)
def test_already_there_is_a_quiet_no_op(make_lease, team, other_team, status):
    moving = {"transfer_team": other_team} if status == LeaseStatus.TRANSFERRING else {}
    lease = make_lease(team, status, **moving)
    events = LeaseEvent.objects.filter(lease=lease).count()
    _, changed = lease_transition(lease_id=lease.pk, to_status=status, action=LeaseAction.NOTE)
    assert changed is False
    assert LeaseEvent.objects.filter(lease=lease).count() == events


def test_batch_transition_costs_constant_queries(make_lease, team, django_assert_max_num_queries):
    small = [make_lease(team).pk for _ in range(3)]
    big = [make_lease(team).pk for _ in range(60)]
    now = timezone.now()
    changes = {"joined_at": now, "expires_at": now + timedelta(days=30)}
    with django_assert_max_num_queries(6) as small_ctx:
        leases_transition(lease_ids=small, to_status="active", action="joined", changes=changes)
    with django_assert_max_num_queries(6) as big_ctx:
        result = leases_transition(lease_ids=big, to_status="active", action="joined", changes=changes)
    assert len(result.changed) == 60
    assert len(big_ctx.captured_queries) == len(small_ctx.captured_queries)


def test_batch_reports_refused_missing_and_unchanged(make_lease, team):
    pending = make_lease(team)
    cancelled = make_lease(team, LeaseStatus.CANCELLED)
    active = make_lease(team, LeaseStatus.ACTIVE)
    result = leases_transition(
        lease_ids=[pending.pk, cancelled.pk, active.pk, 999_999],
        to_status=LeaseStatus.ACTIVE,
        action=LeaseAction.JOINED,
        changes={"joined_at": timezone.now(), "expires_at": timezone.now() + timedelta(days=1)},
    )
    assert [lease.pk for lease in result.changed] == [pending.pk]
    assert [lease.pk for lease in result.unchanged] == [active.pk]
    assert [e.lease_id for e in result.refused] == [cancelled.pk]
    assert result.missing == [999_999]


def test_expect_from_narrows_the_sources(make_lease, team):
    failed = make_lease(team, LeaseStatus.FAILED)
    with pytest.raises(IllegalTransitionError):
        lease_transition(
            lease_id=failed.pk,
            to_status=LeaseStatus.ACTIVE,
            action=LeaseAction.JOINED,
            expect_from=[LeaseStatus.PENDING],
        )
    assert MemberLease.objects.get(pk=failed.pk).status == LeaseStatus.FAILED


def test_a_step_cannot_change_status(make_lease, team):
    lease = make_lease(team)
    with pytest.raises(ValueError, match="status"):
        lease_step(lease_id=lease.pk, action=LeaseAction.NOTE, changes={"status": LeaseStatus.ACTIVE})


def test_steps_are_checked_against_the_status(make_lease, team, other_team):
    """A step a status does not list is refused like an illegal transition: nothing written."""
    lease = make_lease(team, LeaseStatus.ACTIVE)
    before = MemberLease.objects.values().get(pk=lease.pk)
    with pytest.raises(IllegalTransitionError):
        lease_step(lease_id=lease.pk, action=LeaseAction.INVITED, changes={"transfer_step": TransferStep.INVITED})
    assert MemberLease.objects.values().get(pk=lease.pk) == before
    moved = lease_step(lease_id=lease.pk, action=LeaseAction.NOTE, detail={"note": "checked"})
    event = LeaseEvent.objects.filter(lease=lease).latest("id")
    assert (event.action, event.from_status, event.to_status) == ("note", "active", "active")
    assert moved.status == LeaseStatus.ACTIVE


def test_a_lost_claim_makes_the_write_stale_and_changes_nothing(make_lease, team, other_team):
    lease = make_lease(team, LeaseStatus.ACTIVE)
    assert lease_claim(lease_id=lease.pk, owner="worker-a")
    with pytest.raises(StaleLease, match="claimed by another worker"):
        lease_transition(
            lease_id=lease.pk,
            to_status=LeaseStatus.TRANSFERRING,
            action=LeaseAction.TRANSFER_STARTED,
            claim="worker-b",
            changes={"transfer_team": other_team},
        )
    with pytest.raises(StaleLease):
        lease_step(lease_id=lease.pk, action=LeaseAction.NOTE, unclaimed=True)  # an operator, while a worker holds it
    assert MemberLease.objects.get(pk=lease.pk).status == LeaseStatus.ACTIVE
    moved, changed = lease_transition(
        lease_id=lease.pk,
        to_status=LeaseStatus.TRANSFERRING,
        action=LeaseAction.TRANSFER_STARTED,
        claim="worker-a",
        changes={"transfer_team": other_team},
    )
    assert changed and moved.claimed_by == "worker-a"
    # An expired claim is lost too, even for its owner.
    MemberLease.objects.filter(pk=lease.pk).update(claimed_until=timezone.now() - timedelta(seconds=1))
    with pytest.raises(StaleLease, match="expired"):
        lease_step(lease_id=lease.pk, action=LeaseAction.TRANSFER_RETRY, claim="worker-a")


def test_final_statuses_drop_claims_and_requests(make_lease, team):
    lease = make_lease(team, LeaseStatus.ACTIVE)
    assert lease_claim(lease_id=lease.pk, owner="op")
    MemberLease.objects.filter(pk=lease.pk).update(cancel_requested_at=timezone.now())
    moved, _ = lease_transition(
        lease_id=lease.pk, to_status=LeaseStatus.CANCELLED, action=LeaseAction.CANCELLED, claim="op"
    )
    assert (moved.claimed_by, moved.claimed_until, moved.cancel_requested_at) == ("", None, None)


def test_a_failed_save_writes_no_event(make_lease, team):
    lease = make_lease(team)
    events = LeaseEvent.objects.count()
    with pytest.raises(IntegrityError), transaction.atomic():
        # active without joined_at/expires_at is refused by the database, and the event with it
        lease_transition(lease_id=lease.pk, to_status=LeaseStatus.ACTIVE, action=LeaseAction.JOINED)
    assert LeaseEvent.objects.count() == events
    assert MemberLease.objects.get(pk=lease.pk).status == LeaseStatus.PENDING


# -- database constraints ------------------------------------------------------------------------------
def _violates(callable_) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        callable_()


def test_active_needs_joined_and_expires(team):
    _violates(lambda: MemberLease.objects.create(email="a@x.io", team=team, term_months=1, status="active"))


def test_one_open_lease_per_email_case_insensitive(team, other_team, make_lease):
    make_lease(team, email="Same@Example.com")
    _violates(lambda: MemberLease.objects.create(email="same@example.COM", team=team, term_months=1))
    _violates(lambda: MemberLease.objects.create(email="same@example.com", team=other_team, term_months=1))
    make_lease(team, LeaseStatus.CANCELLED, email="same@example.com")  # final leases do not count
    make_lease(other_team, LeaseStatus.EXPIRED, email="same@example.com")


def test_a_cancel_request_only_on_open_leases(team, make_lease):
    lease = make_lease(team, LeaseStatus.CANCELLED)
    _violates(lambda: MemberLease.objects.filter(pk=lease.pk).update(cancel_requested_at=timezone.now()))


def test_events_are_append_only_in_python(make_lease, team):
    from leases.models import AppendOnlyError

    lease = make_lease(team)
    event = LeaseEvent.objects.filter(lease=lease).first()
    event.detail = {"rewritten": True}
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        LeaseEvent.objects.filter(lease=lease).update(detail={})
    with pytest.raises(AppendOnlyError):
        LeaseEvent.objects.filter(lease=lease).delete()


def test_transfer_fields_only_while_transferring(team, other_team, make_lease):
    lease = make_lease(team, LeaseStatus.ACTIVE)
    _violates(lambda: MemberLease.objects.filter(pk=lease.pk).update(transfer_team=other_team))
    _violates(lambda: MemberLease.objects.filter(pk=lease.pk).update(transfer_step=TransferStep.INVITED))
    lease = make_lease(team, LeaseStatus.TRANSFERRING)
    _violates(lambda: MemberLease.objects.filter(pk=lease.pk).update(transfer_team=team))


def test_expires_after_joined(team):
    now = timezone.now()
    _violates(
        lambda: MemberLease.objects.create(
            email="b@x.io", team=team, term_months=1, joined_at=now, expires_at=now - timedelta(seconds=1)
        )
    )


def test_unknown_status_refused(team):
    _violates(lambda: MemberLease.objects.create(email="c@x.io", team=team, term_months=1, status="awaiting_join"))


def test_redeemed_code_points_at_exactly_one_lease(team, make_lease):
    _violates(lambda: RedemptionCode.objects.create(code="A-1", term_months=1, redeemed_at=timezone.now()))
    lease = make_lease(team)
    RedemptionCode.objects.create(code="A-2", term_months=1, redeemed_at=timezone.now(), lease=lease)
    # Several codes point at one lease when they renewed it.
    RedemptionCode.objects.create(code="A-3", term_months=1, redeemed_at=timezone.now(), lease=lease)
    _violates(lambda: RedemptionCode.objects.create(code="a-2", term_months=1))  # case-insensitive unique
    _violates(lambda: RedemptionCode.objects.create(code="A-4", term_months=3, total_months=2))
