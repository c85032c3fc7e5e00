"""Fixtures of the lease engine tests (imported by tests/conftest.py): a real local fake team
provider server, teams, leases and codes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.providers.memory import fake_teams_reset
from leases.services.transitions import teams_seats_recount
from leasesite.fakes.team_provider_server import FakeProviderServer

TEAM_TOKEN = "team-api-token-0123456789abcdef"  # the fake provider's test credential


@pytest.fixture
def provider() -> Iterator[FakeProviderServer]:
    """A real local HTTP server playing the team provider (DESIGN §4); it checks the bearer token."""
    with FakeProviderServer(token=TEAM_TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_memory_teams() -> Iterator[None]:
    fake_teams_reset()
    yield
    fake_teams_reset()


@pytest.fixture
def make_team(provider: FakeProviderServer) -> Callable[..., Team]:
    def factory(name: str, capacity: int = 10, **kwargs: object) -> Team:
        kwargs.setdefault("provider", "http")
        kwargs.setdefault("api_base", provider.team_url(name))
        kwargs.setdefault("api_token", TEAM_TOKEN)
        return Team.objects.create(name=name, capacity=capacity, **kwargs)

    return factory


_emails = itertools.count(1)


@pytest.fixture
def make_lease() -> Callable[..., MemberLease]:
    """A lease in any state, written directly (set-up only; the code under test uses services)."""

    def factory(team: Team | None, status: str = LeaseStatus.PENDING, **kwargs: object) -> MemberLease:
        now = timezone.now()
        kwargs.setdefault("email", f"user{next(_emails)}@example.com")
        kwargs.setdefault("term_months", 1)
        if status == LeaseStatus.WAITING:  # no team, never invited (a constraint)
            team, kwargs["invited_at"] = None, None
        kwargs.setdefault("invited_at", now - timedelta(days=1))
        if team is not None:
            kwargs.setdefault("pool", team.pool)
        if status in (LeaseStatus.ACTIVE, LeaseStatus.FAILED, LeaseStatus.TRANSFERRING):
            kwargs.setdefault("joined_at", now - timedelta(days=20))
            kwargs.setdefault("expires_at", now + timedelta(days=10))
        lease = MemberLease.objects.create(team=team, status=status, **kwargs)
        LeaseEvent.objects.create(lease=lease, action=LeaseAction.NOTE, to_status=status, detail={"note": "fixture"})
        # Written directly, bypassing the transition function: the seat counters are recounted.
        teams_seats_recount(team_ids=[pk for pk in (lease.team_id, lease.transfer_team_id) if pk is not None])
        return lease

    return factory


@pytest.fixture
def make_code() -> Callable[..., RedemptionCode]:
    counter = itertools.count(1)

    def factory(code: str | None = None, term_months: int = 1, total_months: int | None = None) -> RedemptionCode:
        return RedemptionCode.objects.create(
            code=code or f"TEST-CODE-{next(counter):04d}-AAAA", term_months=term_months, total_months=total_months
        )

    return factory
