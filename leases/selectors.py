"""Read-only queries of the lease engine that more than one service uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from leases.models import NON_FINAL_STATUSES, LeaseStatus, MemberLease, Team, TeamHealth
from leases.timeutils import add_months


def _count_subquery(**filters: object) -> Coalesce:
    rows = (
        MemberLease.objects.filter(**filters)
        .order_by()
        .values(next(iter(filters)).split("__")[0])
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


def teams_with_seat_usage(queryset: QuerySet[Team] | None = None) -> QuerySet[Team]:
    """Teams annotated with ``seats_held`` (leases seated or invited there, incoming transfers
    included) in one query."""
    queryset = Team.objects.all() if queryset is None else queryset
    return queryset.annotate(
        leases_held=_count_subquery(team=OuterRef("pk"), status__in=NON_FINAL_STATUSES),
        leases_incoming=_count_subquery(transfer_team=OuterRef("pk"), status=LeaseStatus.TRANSFERRING),
    )


def team_seats_used(team: Team) -> int:
    """Seats in use: our leases (pending invites count) or, if larger, what the provider showed
    at the last sync (members and invites we do not lease use seats too)."""
    held = getattr(team, "leases_held", None)
    incoming = getattr(team, "leases_incoming", None)
    if held is None or incoming is None:
        annotated = teams_with_seat_usage(Team.objects.filter(pk=team.pk)).get()
        held, incoming = annotated.leases_held, annotated.leases_incoming
    ours = held + incoming
    seen = (team.members_seen or 0) + (team.invites_seen or 0)
    return max(ours, seen)


@dataclass(frozen=True)
class TeamChoice:
    team: Team
    free: int
    covers_term: bool


def pool_teams_lock(pool: str) -> None:
    """Lock the pool's active team rows, always in primary-key order (no deadlocks): whoever
    counts the pool's seats to take one (a redemption, a transfer start, a waiting-list drain)
    holds this until its transaction ends."""
    list(Team.objects.filter(is_active=True, pool=pool).order_by("pk").select_for_update().values_list("pk", flat=True))


def team_is_open_for_new_members(team: Team, now: datetime | None = None) -> bool:
    """``teams_open_for_new_members`` for one team already loaded."""
    now = now or timezone.now()
    return team.is_active and team.health != TeamHealth.DEAD and (team.expires_at is None or team.expires_at > now)


def team_free_seats(team: Team, now: datetime | None = None) -> int:
    """Seats a redemption or the waiting list may still take (0 for a team closed to newcomers)."""
    if not team_is_open_for_new_members(team, now):
        return 0
    return max(0, team.capacity - team_seats_used(team))


def teams_open_for_new_members(*, pool: str | None = None, now: datetime | None = None) -> QuerySet[Team]:
    """Teams that may take a redemption or a transfer in: active, not ended, not dead (DESIGN §4),
    inside ``pool`` when one is given."""
    now = now or timezone.now()
    teams = (
        Team.objects.filter(is_active=True)
        .exclude(health=TeamHealth.DEAD)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    )
    return teams.filter(pool=pool) if pool is not None else teams


def team_choices(
    *,
    term_months: int,
    email: str,
    exclude_team_ids: tuple[int, ...] = (),
    pool: str | None = None,
    now: datetime | None = None,
) -> list[TeamChoice]:
    """Teams a lease may go to, best first: open for new members (in ``pool``), a free seat, the
    email not already there; healthy before degraded, then those whose own ``expires_at`` covers
    the whole next term, then most free seats."""
    now = now or timezone.now()
    term_end = add_months(now, term_months)
    # Not NULL: a waiting lease has no team, and "pk NOT IN (…, NULL)" would exclude every team.
    busy_team_ids = MemberLease.objects.filter(
        email__iexact=email, status__in=NON_FINAL_STATUSES, team__isnull=False
    ).values("team_id")
    candidates = (
        teams_with_seat_usage(teams_open_for_new_members(pool=pool, now=now))
        .exclude(pk__in=exclude_team_ids)
        .exclude(pk__in=busy_team_ids)
        .order_by("pk")
    )
    choices = []
    for team in candidates:
        free = team.capacity - team_seats_used(team)
        if free > 0:
            covers = team.expires_at is None or team.expires_at >= term_end
            choices.append(TeamChoice(team=team, free=free, covers_term=covers))
    choices.sort(key=lambda c: (c.team.health != TeamHealth.HEALTHY, not c.covers_term, -c.free, c.team.pk))
    return choices


def leases_due_for_transfer(*, now: datetime | None = None) -> QuerySet[MemberLease]:
    """Active leases past ``expires_at``, open leases of a dead team (evacuation), leases with a
    cancel request, and transfers whose retry time has come (or that a crashed worker left behind),
    not claimed by a live worker."""
    now = now or timezone.now()
    due = (
        Q(status=LeaseStatus.ACTIVE, expires_at__lte=now)
        | Q(status__in=(LeaseStatus.ACTIVE, LeaseStatus.PENDING), team__health=TeamHealth.DEAD)
        | Q(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now), status=LeaseStatus.TRANSFERRING)
        | Q(cancel_requested_at__isnull=False, status__in=NON_FINAL_STATUSES)
    )
    unclaimed = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    return MemberLease.objects.filter(due & unclaimed)


def lease_by_public_id(public_id: str) -> MemberLease | None:
    try:
        return MemberLease.objects.select_related("team").get(public_id=public_id)
    except (MemberLease.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def lease_by_code_and_email(*, code: str, email: str) -> MemberLease | None:
    """The lease a code was redeemed for (the newest, when it renewed one), if ``email`` is its
    email; None for any mismatch (which half was wrong is not told)."""
    from leases.models import RedemptionCode
    from leases.services.redemption import code_normalize

    redemption = (
        RedemptionCode.objects.select_related("lease")
        .filter(code__iexact=code_normalize(code), lease__isnull=False)
        .first()
    )
    if redemption is None or redemption.lease.email.lower() != (email or "").strip().lower():
        return None
    return redemption.lease


def failed_leases_of_team(team: Team) -> QuerySet[MemberLease]:
    """Failed leases that failed on ``team``: seated there, or whose transfer gave up on a call to
    it (the ``transfer_failed`` event names the team that failed). One query."""
    from leases.models import LeaseAction, LeaseEvent

    gave_up_here = LeaseEvent.objects.filter(action=LeaseAction.TRANSFER_FAILED, detail__failed_team=team.name).values(
        "lease_id"
    )
    return MemberLease.objects.filter(Q(team=team) | Q(pk__in=gave_up_here), status=LeaseStatus.FAILED)
