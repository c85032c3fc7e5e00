"""Read-only queries of the lease engine that more than one service uses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce, Lower
from django.utils import timezone

from leases.models import (
    NON_FINAL_STATUSES,
    SEAT_HOLDING_STATUSES,
    LeaseStatus,
    MemberLease,
    Team,
    TeamHealth,
)
from leases.timeutils import add_months


def seat_counts_of(status: str, team_id: int | None, transfer_team_id: int | None) -> Counter[int]:
    """The seats one lease holds, team id -> 1: its team while pending, active, transferring or
    failed (a pending invite is a used seat; a failed lease may still be seated), and, while
    transferring, the seat reserved in the team it moves to. Waiting, cancelled and expired hold
    nothing. ``Team.seats_taken`` is the sum of this over the team's leases."""
    seats: Counter[int] = Counter()
    if team_id is not None and status in SEAT_HOLDING_STATUSES:
        seats[team_id] += 1
    if transfer_team_id is not None and status == LeaseStatus.TRANSFERRING:
        seats[transfer_team_id] += 1
    return seats


def teams_seat_recount(*, team_ids: Iterable[int] | None = None) -> dict[int, int]:
    """What ``Team.seats_taken`` should be, recounted from the leases (two grouped queries):
    team id -> seats (teams holding none are left out)."""
    ids = None if team_ids is None else list(team_ids)
    held = MemberLease.objects.filter(status__in=SEAT_HOLDING_STATUSES, team__isnull=False)
    incoming = MemberLease.objects.filter(status=LeaseStatus.TRANSFERRING, transfer_team__isnull=False)
    if ids is not None:
        held, incoming = held.filter(team_id__in=ids), incoming.filter(transfer_team_id__in=ids)
    counts: Counter[int] = Counter()
    for team_id, n in held.order_by().values("team_id").annotate(n=Count("pk")).values_list("team_id", "n"):
        counts[team_id] += n
    for team_id, n in (
        incoming.order_by().values("transfer_team_id").annotate(n=Count("pk")).values_list("transfer_team_id", "n")
    ):
        counts[team_id] += n
    return dict(counts)


def teams_seat_drift() -> dict[str, tuple[int, int]]:
    """Teams whose counter differs from a recount: name -> (counter, recount). Read-only (a
    transition committing between the two reads can show as a one-off difference; the orphan
    check repairs under the team's lock with ``teams_seats_recount``)."""
    counters = list(Team.objects.order_by("pk").values_list("pk", "name", "seats_taken"))
    recount = teams_seat_recount()
    return {name: (taken, recount.get(pk, 0)) for pk, name, taken in counters if recount.get(pk, 0) != taken}


def email_open_leases(email: str) -> QuerySet[MemberLease]:
    """The open leases of ``email`` (any case), through the ``lower(email)`` index: ``iexact``
    compiles to ``UPPER(email) = UPPER(%s)`` on PostgreSQL, which no index serves."""
    return MemberLease.objects.alias(email_lower=Lower("email")).filter(
        email_lower=(email or "").strip().lower(), status__in=NON_FINAL_STATUSES
    )


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
    """Teams annotated with ``leases_held`` (open leases seated or invited there) and
    ``leases_incoming`` (transfers on their way in), recounted in one query — for lists that show
    the breakdown. Seat decisions read the counter (``team_seats_used``) instead."""
    queryset = Team.objects.all() if queryset is None else queryset
    return queryset.annotate(
        leases_held=_count_subquery(team=OuterRef("pk"), status__in=NON_FINAL_STATUSES),
        leases_incoming=_count_subquery(transfer_team=OuterRef("pk"), status=LeaseStatus.TRANSFERRING),
    )


def team_seats_used(team: Team) -> int:
    """Seats in use, in constant time: our leases (``Team.seats_taken``: pending invites and
    incoming transfers count) or, if larger, what the provider showed at the last sync (members
    and invites we do not lease use seats too)."""
    seen = (team.members_seen or 0) + (team.invites_seen or 0)
    return max(team.seats_taken, seen)


@dataclass(frozen=True)
class TeamChoice:
    team: Team
    free: int
    covers_term: bool


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
    the whole next term, then most free seats. One query, no lock, read from the counters: the
    caller seats the lease with ``seat_take_first``, which re-checks the chosen team's counter
    on its locked row."""
    now = now or timezone.now()
    term_end = add_months(now, term_months)
    # Not NULL: a waiting lease has no team, and "pk NOT IN (…, NULL)" would exclude every team.
    busy_team_ids = email_open_leases(email).filter(team__isnull=False).values("team_id")
    candidates = (
        teams_open_for_new_members(pool=pool, now=now)
        .exclude(pk__in=exclude_team_ids)
        .exclude(pk__in=busy_team_ids)
        .defer("api_token")
        .order_by("pk")
    )
    return rank_team_choices(candidates, term_end=term_end)


def rank_team_choices(
    teams: Iterable[Team], *, term_end: datetime, taken_meanwhile: Mapping[int, int] | None = None
) -> list[TeamChoice]:
    """``teams`` with a free seat, best first (the order ``team_choices`` promises). Seats a
    caller has already promised to other leases (``taken_meanwhile``: team id -> seats) count as
    used, so one batch of leases spreads over the teams as one lease after the other would."""
    taken_meanwhile = taken_meanwhile or {}
    choices = []
    for team in teams:
        free = team.capacity - max(team_seats_used(team), team.seats_taken + taken_meanwhile.get(team.pk, 0))
        if free > 0:
            covers = team.expires_at is None or team.expires_at >= term_end
            choices.append(TeamChoice(team=team, free=free, covers_term=covers))
    choices.sort(key=lambda c: (c.team.health != TeamHealth.HEALTHY, not c.covers_term, -c.free, c.team.pk))
    return choices


def teams_open_by_pool(*, pools: Iterable[str], now: datetime | None = None) -> dict[str, list[Team]]:
    """The teams open for new members in each of ``pools`` (one query, primary-key order), with
    their API tokens: a transfer run invites through them."""
    by_pool: dict[str, list[Team]] = {}
    for team in teams_open_for_new_members(now=now).filter(pool__in=list(pools)).order_by("pk"):
        by_pool.setdefault(team.pool, []).append(team)
    return by_pool


def emails_seated_team_ids(emails: Iterable[str]) -> dict[str, set[int]]:
    """Lower-cased email -> the teams its open leases sit in, for many emails in one query
    (through the ``lower(email)`` index)."""
    wanted = sorted({(email or "").strip().lower() for email in emails})
    seated: dict[str, set[int]] = {}
    rows = (
        MemberLease.objects.annotate(email_lower=Lower("email"))
        .filter(email_lower__in=wanted, status__in=NON_FINAL_STATUSES, team__isnull=False)
        .values_list("email_lower", "team_id")
    )
    for email, team_id in rows:
        seated.setdefault(email, set()).add(team_id)
    return seated


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
