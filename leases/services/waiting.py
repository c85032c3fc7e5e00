"""The waiting list: leases redeemed while their pool had no free seat, seated first come, first
served as seats free up (DESIGN §5).

``waiting_drain`` is called wherever a seat may have freed — after a join sync, after a transfer
run (expiries), after a cancelled lease's seats are freed — and is safe to run twice at once: each
step takes the pool's oldest waiting lease under a row lock (a second drain waits for it, then
sees it seated) and seats it through the transition function (``waiting → pending``, which
refuses a lease already seated) in the best team by the seat counters — the counter re-checked
on that team's locked row, the next team when the seat went meanwhile (``seat_take_first``,
the rule redemptions and transfers follow). The invite goes out as the
``leases.invite_lease`` task after the commit, so a drain never calls a provider itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from leases import events
from leases.models import LeaseStatus, MemberLease, Team
from leases.selectors import team_choices, teams_open_for_new_members
from leases.services.transitions import LeaseError, StaleLease, lease_transition, seat_take_first

logger = logging.getLogger(__name__)

MAX_SEATED_PER_DRAIN = 10_000  # a bound on one call; the next drain goes on


@dataclass(frozen=True)
class Seated:
    lease_id: int
    team: str


def waiting_position(lease: MemberLease) -> int | None:
    """1 for the next lease to be seated in its pool; None when the lease is not waiting."""
    if lease.status != LeaseStatus.WAITING:
        return None
    ahead = MemberLease.objects.filter(status=LeaseStatus.WAITING, pool=lease.pool).filter(
        Q(created_at__lt=lease.created_at) | Q(created_at=lease.created_at, pk__lt=lease.pk)
    )
    return ahead.count() + 1


def waiting_pools() -> list[str]:
    return sorted(set(MemberLease.objects.filter(status=LeaseStatus.WAITING).values_list("pool", flat=True)))


def waiting_drain(*, pool: str | None = None) -> list[Seated]:
    """Seat waiting leases (oldest first) in every pool, or in ``pool``, while seats are free."""
    seated: list[Seated] = []
    for name in [pool] if pool is not None else waiting_pools():
        while len(seated) < MAX_SEATED_PER_DRAIN:
            done = _seat_next(name)
            if done is None:
                break
            seated.append(done)
    if seated:
        logger.info(
            "waiting list: seated %d lease(s): %s", len(seated), ", ".join(f"{s.lease_id}→{s.team}" for s in seated)
        )
    return seated


def _seat_next(pool: str) -> Seated | None:
    from leases.tasks import invite_lease

    with transaction.atomic():
        lease = (
            MemberLease.objects.select_for_update()
            .filter(status=LeaseStatus.WAITING, pool=pool)
            .order_by("created_at", "pk")
            .first()
        )
        if lease is None:
            return None
        choices = team_choices(term_months=lease.term_months, email=lease.email, pool=pool)
        waited_since = lease.created_at

        def seat(team: Team) -> MemberLease:
            seated, _changed = lease_transition(
                lease_id=lease.pk,
                to_status=LeaseStatus.PENDING,
                expect_from=[LeaseStatus.WAITING],
                unclaimed=True,
                changes={"team": team, "missed_syncs": 0},
                **events.seated(team=team, waited_since=waited_since),
            )
            return seated

        try:
            done = seat_take_first(teams=[c.team for c in choices], attempt=seat)
        except (LeaseError, StaleLease) as exc:
            logger.warning("waiting lease %s not seated: %s", lease.pk, exc)
            return None
        if done is None:
            return None
        team = done[0]
        lease_id = lease.pk
        transaction.on_commit(lambda: invite_lease.delay(lease_id=lease_id))
    return Seated(lease_id, team.name)


def pool_seats(pool: str) -> tuple[int, int]:
    """(free seats in the pool's open teams, leases waiting in the pool)."""
    from leases.selectors import team_free_seats

    now = timezone.now()
    free = sum(team_free_seats(team, now) for team in teams_open_for_new_members(pool=pool, now=now).defer("api_token"))
    waiting = MemberLease.objects.filter(status=LeaseStatus.WAITING, pool=pool).count()
    return free, waiting
