"""A stateful test of the lease state machine through the services (hypothesis).

Hypothesis plays random sequences of what happens to leases — redemptions, members joining and the
join sync, time passing and transfer runs, provider failures, teams dying and coming back,
operators cancelling, resetting, retrying and forcing transfers, a worker dying while it holds a
lease — against ``memory`` teams, and after every step checks what must always hold: every event
follows the transition and step tables, one open lease per email, no team over capacity, nobody
seated at the provider where no lease (or a recorded failure to free a seat) says, no claim left
behind, and every team's maintained seat counter (``Team.seats_taken``) equal to a recount.
Each example runs in a savepoint rolled back at its end: lease events are append-only
(never deleted), so rolling back is how an example starts from clean rows.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import timedelta

import pytest
import time_machine
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from leases.models import (
    ALLOWED_TRANSITIONS,
    FINAL_STATUSES,
    STEP_ACTIONS,
    LeaseAction,
    LeaseEvent,
    LeaseStatus,
    MemberLease,
    RedemptionCode,
    Team,
    TeamHealth,
)
from leases.providers import PermanentProviderError, TeamDeadError, TransientProviderError
from leases.providers.memory import fake_team, fake_teams_reset
from leases.services.cancellation import lease_cancel
from leases.services.health import team_health_set
from leases.services.operator import lease_force_transfer, lease_reset, lease_retry
from leases.services.redemption import RedemptionError, redeem
from leases.services.sync import joins_sync
from leases.services.transfers import transfers_run
from leases.services.transitions import LeaseError, lease_claim

TEAM_CAPACITIES = {"sm-a": 2, "sm-b": 2, "sm-c": 3}
EMAILS = [f"customer{n}@example.com" for n in range(5)]
OPEN = [s.value for s in LeaseStatus if s not in FINAL_STATUSES]
CRASHED_WORKER = "crashed-worker"
RUN_LIMIT = 100  # a run that claims this many leases in this small world is looping
FAILURES = {
    "transient": lambda: TransientProviderError("provider busy", status=503),
    "permanent": lambda: PermanentProviderError("bad request", status=400),
    "dead": lambda: TeamDeadError("credentials revoked", status=401),
}
# A transfer run may meet one team's provider failing every call.
OUTAGES = st.none() | st.tuples(st.sampled_from(sorted(TEAM_CAPACITIES)), st.sampled_from(sorted(FAILURES)))
_codes = itertools.count(1)


class LeaseWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        fake_teams_reset()
        self._savepoint = transaction.atomic()
        self._savepoint.__enter__()
        self._clock = time_machine.travel(timezone.now(), tick=True)
        self._time = self._clock.start()
        self.teams = {
            name: Team.objects.create(name=name, provider="memory", api_base=name, capacity=capacity)
            for name, capacity in TEAM_CAPACITIES.items()
        }

    def teardown(self) -> None:
        self._clock.stop()
        transaction.set_rollback(True)
        self._savepoint.__exit__(None, None, None)
        fake_teams_reset()

    # -- helpers ------------------------------------------------------------------------------------
    def _exists(self, *statuses: str) -> bool:
        return MemberLease.objects.filter(status__in=statuses).exists()

    def _pick(self, pick: int, *statuses: str) -> MemberLease | None:
        leases = MemberLease.objects.order_by("pk")
        if statuses:
            leases = leases.filter(status__in=statuses)
        ids = list(leases.values_list("pk", flat=True))
        return MemberLease.objects.select_related("team").get(pk=ids[pick % len(ids)]) if ids else None

    # -- customers ----------------------------------------------------------------------------------
    @rule(email=st.sampled_from(EMAILS), term=st.integers(1, 2), extra=st.sampled_from([None, 0, 1]))
    def redeem_a_code(self, email: str, term: int, extra: int | None) -> None:
        code = RedemptionCode.objects.create(
            code=f"SM-{next(_codes):08d}", term_months=term, total_months=None if extra is None else term + extra
        )
        try:
            lease = redeem(code=code.code, email=email)
        except RedemptionError:
            code.refresh_from_db()
            assert (code.redeemed_at, code.lease_id) == (None, None)  # a refused code stays unused
            return
        code.refresh_from_db()
        assert code.lease_id == lease.pk and lease.email == email

    @initialize(
        customers=st.lists(
            st.tuples(st.sampled_from(EMAILS), st.sampled_from([None, 0, 1])),
            min_size=1,
            max_size=4,
            unique_by=lambda c: c[0],
        )
    )
    def customers_redeem(self, customers: list[tuple[str, int | None]]) -> None:
        for email, extra in customers:
            self.redeem_a_code(email=email, term=1, extra=extra)

    @staticmethod
    def _invites() -> list[tuple[str, str]]:
        return sorted((team, email) for team in TEAM_CAPACITIES for email in fake_team(team).invited_emails())

    @precondition(lambda self: self._invites())
    @rule(pick=st.integers(0, 9), sync=st.booleans())
    def someone_accepts_an_invite(self, pick: int, sync: bool) -> None:
        """A person accepts an invite waiting for them at the provider, and the join sync runs at
        once (or later, as its own step)."""
        invites = self._invites()
        team, email = invites[pick % len(invites)]
        fake_team(team).accept(email)
        if sync:
            self.join_sync()

    @rule()
    def join_sync(self) -> None:
        joins_sync()

    # -- time and the transfer executor -----------------------------------------------------------------
    @rule(days=st.integers(1, 70), people_join=st.booleans(), run=st.booleans(), outage=OUTAGES)
    def time_passes(self, days: int, people_join: bool, run: bool, outage: tuple[str, str] | None) -> None:
        """Days pass: maybe everyone invited joins meanwhile (and the join sync sees them); then
        the periodic transfer run comes, or comes later as its own step."""
        self._time.shift(timedelta(days=days))
        if people_join:
            for team, email in self._invites():
                fake_team(team).accept(email)
            self.join_sync()
        if run:
            self.transfer_run(outage=outage)

    @rule(outage=OUTAGES)
    def transfer_run(self, outage: tuple[str, str] | None) -> None:
        """A transfer run, maybe while one team's provider fails every call."""
        if outage is None:
            result = transfers_run(limit=RUN_LIMIT)
        else:
            failing = fake_team(outage[0])
            failing.fail_next[:] = [FAILURES[outage[1]]() for _ in range(RUN_LIMIT * 10)]
            try:
                result = transfers_run(limit=RUN_LIMIT)
            finally:
                failing.fail_next.clear()
        assert result.claimed < RUN_LIMIT, "the run kept claiming the same leases"
        for outcome in result.outcomes:
            # One worker alone: nobody can take a lease from it, and no database error is normal.
            assert outcome.outcome != "stale", outcome
            assert not outcome.detail.startswith("database error"), outcome

    @precondition(lambda self: self._exists(*OPEN))
    @rule(pick=st.integers(0, 9))
    def worker_dies_holding_a_lease(self, pick: int) -> None:
        """A worker claimed the lease and died: its claim holds until LEASE_CLAIM_TTL runs out."""
        lease_claim(lease_id=self._pick(pick, *OPEN).pk, owner=CRASHED_WORKER)

    # -- the providers and the teams ----------------------------------------------------------------------
    @rule(
        team=st.sampled_from(sorted(TEAM_CAPACITIES)), kind=st.sampled_from(sorted(FAILURES)), times=st.integers(1, 3)
    )
    def provider_fails_next_calls(self, team: str, kind: str, times: int) -> None:
        fake_team(team).fail_next.extend(FAILURES[kind]() for _ in range(times))

    @rule(team=st.sampled_from(sorted(TEAM_CAPACITIES)), health=st.sampled_from([TeamHealth.DEAD, TeamHealth.HEALTHY]))
    def operator_sets_team_health(self, team: str, health: str) -> None:
        team_health_set(team_id=self.teams[team].pk, health=health, reason="operator")

    # -- operators ------------------------------------------------------------------------------------
    @precondition(lambda self: self._exists(*OPEN))
    @rule(pick=st.integers(0, 9))
    def operator_cancels(self, pick: int) -> None:
        lease = self._pick(pick, *OPEN)
        outcome = lease_cancel(lease_id=lease.pk, reason="operator")
        lease.refresh_from_db()
        if outcome.cancelled:
            assert lease.status == LeaseStatus.CANCELLED
        else:  # a worker holds it: the request waits for the worker
            assert lease.claimed_by == CRASHED_WORKER and lease.cancel_requested_at is not None

    @precondition(lambda self: self._exists(LeaseStatus.FAILED))
    @rule(pick=st.integers(0, 9), operation=st.sampled_from(["reset", "retry"]))
    def operator_resets_or_retries_a_failed_lease(self, pick: int, operation: str) -> None:
        lease = self._pick(pick, LeaseStatus.FAILED)
        act, expected = {
            "reset": (lease_reset, LeaseStatus.ACTIVE),
            "retry": (lease_retry, LeaseStatus.TRANSFERRING),
        }[operation]
        try:
            act(lease_id=lease.pk)
        except LeaseError:
            assert lease.claimed_by == CRASHED_WORKER  # the only reason to refuse a failed lease
            return
        lease.refresh_from_db()
        assert lease.status == expected

    @precondition(lambda self: self._exists(LeaseStatus.ACTIVE))
    @rule(pick=st.integers(0, 9))
    def operator_forces_a_transfer(self, pick: int) -> None:
        lease = self._pick(pick, LeaseStatus.ACTIVE)
        try:
            lease_force_transfer(lease_id=lease.pk)
        except LeaseError:
            assert lease.claimed_by == CRASHED_WORKER
            return
        lease.refresh_from_db()
        assert lease.status == LeaseStatus.TRANSFERRING

    # -- what always holds ----------------------------------------------------------------------------
    @invariant()
    def the_books_balance(self) -> None:
        leases = list(MemberLease.objects.order_by("pk"))
        history: dict[int, list[LeaseEvent]] = defaultdict(list)
        for event in LeaseEvent.objects.order_by("id"):
            history[event.lease_id].append(event)
        open_by_email: dict[str, MemberLease] = {}
        seats_held: Counter[int] = Counter()
        for lease in leases:
            assert lease.status in LeaseStatus.values
            self._check_history(lease, history[lease.pk])
            assert lease.claimed_by in ("", CRASHED_WORKER), f"a claim was left behind: {lease.claimed_by}"
            if lease.status in FINAL_STATUSES:
                assert (lease.claimed_by, lease.claimed_until, lease.cancel_requested_at) == ("", None, None)
                continue
            email = lease.email.lower()
            assert email not in open_by_email, f"two open leases for {email}"
            open_by_email[email] = lease
            if lease.status == LeaseStatus.WAITING:
                assert lease.team_id is None  # a waiting lease holds no seat
                continue
            seats_held[lease.team_id] += 1
            if lease.status == LeaseStatus.TRANSFERRING and lease.transfer_team_id:
                seats_held[lease.transfer_team_id] += 1
        counters = dict(Team.objects.values_list("pk", "seats_taken"))
        for team in self.teams.values():
            assert seats_held[team.pk] <= team.capacity, f"team {team.name} over capacity"
            # The maintained counter equals this recount after every step, whatever the step.
            assert counters[team.pk] == seats_held[team.pk], (
                f"team {team.name}: seats_taken {counters[team.pk]}, leases hold {seats_held[team.pk]}"
            )
        self._check_provider_seats(open_by_email, history)

    @staticmethod
    def _check_history(lease: MemberLease, events: list[LeaseEvent]) -> None:
        """Each event starts where the previous one ended, along the tables; a transfer invites
        into the next team before it leaves the old one."""
        assert events, f"lease {lease.pk} has no history"
        first = events[0]
        assert (first.action, first.from_status, first.to_status) in {
            (LeaseAction.REDEEMED, "", LeaseStatus.PENDING),
            (LeaseAction.WAITING, "", LeaseStatus.WAITING),  # every seat taken: the waiting list
        }
        status = first.to_status
        this_transfer: list[tuple[str, str | None]] = []
        for event in events[1:]:
            where = f"lease {lease.pk} event {event.action} {event.from_status}->{event.to_status}"
            assert event.from_status == status, f"{where}: the lease was {status}"
            if event.to_status != event.from_status:
                assert event.to_status in ALLOWED_TRANSITIONS[event.from_status], f"{where}: not allowed"
            else:
                assert event.action in STEP_ACTIONS[event.from_status], f"{where}: step not allowed"
            status = event.to_status
            if event.action in (LeaseAction.TRANSFER_STARTED, LeaseAction.RETRY):
                this_transfer = []
            elif event.action == LeaseAction.TRANSFERRED:
                invited = (LeaseAction.INVITED, event.detail["to_team"])
                left = (LeaseAction.LEFT_OLD_TEAM, event.detail["from_team"])
                assert invited in this_transfer and left in this_transfer, f"{where}: {this_transfer}"
                assert this_transfer.index(invited) < this_transfer.index(left), f"{where}: left before invited"
            elif event.action == LeaseAction.EXPIRED and event.from_status == LeaseStatus.TRANSFERRING:
                assert (LeaseAction.LEFT_OLD_TEAM, event.detail["team"]) in this_transfer, where
            this_transfer.append((event.action, (event.detail or {}).get("team")))
        assert status == lease.status, f"lease {lease.pk} is {lease.status}, its history says {status}"

    def _check_provider_seats(self, open_by_email: dict[str, MemberLease], history: dict) -> None:
        """An email sits (member or invited) only in its open lease's team and transfer target, or
        where our records say a seat may be left (a seat not freed, a dead team's removal skipped,
        an invite that could not be withdrawn). An active lease's member sits in its team, unless
        an operator reset the lease (the operator's word that they do)."""
        by_name = {team.pk: name for name, team in self.teams.items()}
        for email in EMAILS:
            lease = open_by_email.get(email)
            allowed = set()
            if lease is not None and lease.team_id is not None:
                allowed.add(by_name[lease.team_id])
                if lease.transfer_team_id:
                    allowed.add(by_name[lease.transfer_team_id])
            for earlier in MemberLease.objects.filter(email__iexact=email).values_list("pk", flat=True):
                allowed |= self._seats_left_on_record(history[earlier])
            seated = {name for name in self.teams if fake_team(name).seated(email)}
            assert seated <= allowed, f"{email} sits in {sorted(seated - allowed)} where no lease says"
            if (
                lease is not None
                and lease.status == LeaseStatus.ACTIVE
                and all(e.action != LeaseAction.RESET for e in history[lease.pk])
            ):
                assert email in fake_team(by_name[lease.team_id]).member_emails(), f"{email} left its team"

    @staticmethod
    def _seats_left_on_record(events: list[LeaseEvent]) -> set[str]:
        left: set[str] = set()
        targets: set[str] = set()
        for event in events:
            detail = event.detail or {}
            if event.action == LeaseAction.SEAT_NOT_FREED or (
                event.action == LeaseAction.LEFT_OLD_TEAM and detail.get("skipped")
            ):
                left.add(detail["team"])
            elif event.action in (LeaseAction.TRANSFER_STARTED, LeaseAction.TARGET_CHOSEN):
                targets.add(detail.get("to_team"))
                left.add(detail.get("previous"))  # a replaced (dead) target's invite may be left
            elif event.action == LeaseAction.TRANSFER_FAILED and detail.get("invite_withdrawn") is False:
                left |= targets
        return left - {None}


@pytest.mark.django_db
def test_the_lease_state_machine_keeps_its_invariants(settings):
    settings.LEASE_TRANSFER_CONCURRENCY = 1
    settings.LEASE_TRANSFER_MAX_ATTEMPTS = 2
    settings.LEASE_TRANSFER_BACKOFF_SECONDS = 3600
    settings.LEASE_TRANSFER_BACKOFF_MAX_SECONDS = 86400
    settings.LEASE_REINVITE_AFTER_MISSED_SYNCS = 2
    run_state_machine_as_test(
        LeaseWorld,
        settings=hypothesis_settings(
            max_examples=30,
            stateful_step_count=50,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
