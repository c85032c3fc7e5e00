"""The console's overview (the admin home): what is wrong now, the latest runs, what runs next.

Read-only selectors over every app, a fixed number of queries whatever the table sizes (each
count is one aggregate; the charts read at most 30 runs, 30 days of status changes streamed in
chunks, and the active teams). Sections the user may not view are not computed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Count, F, Q
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _

from leasesite import svgcharts

CHART_RUNS = 30
CHART_DAYS = 30
CHART_TEAMS = 40


@dataclass(frozen=True)
class Figure:
    """One count on the overview, linking to the list that shows exactly those rows."""

    label: str
    count: int
    url: str
    bad: bool  # a count above zero is something to fix (shown in red)


@dataclass(frozen=True)
class RunLine:
    label: str
    status: str
    status_label: str
    started_at: datetime | None
    summary: str
    url: str


@dataclass(frozen=True)
class NextRun:
    name: str
    task: str
    at: datetime | None
    url: str


@dataclass
class Overview:
    figures: list[Figure] = field(default_factory=list)
    runs: list[RunLine] = field(default_factory=list)
    next_runs: list[NextRun] = field(default_factory=list)
    orphans: str = ""
    orphans_url: str = ""
    charts: list[tuple[str, SafeString]] = field(default_factory=list)
    pools: list[PoolLine] = field(default_factory=list)


@dataclass(frozen=True)
class PoolLine:
    pool: str
    capacity: int
    used: int
    free: int
    waiting: int
    url: str


def _can(request: HttpRequest, perm: str) -> bool:
    return request.user.has_perm(perm)


def overview_build(request: HttpRequest, *, now: datetime | None = None) -> Overview:
    now = now or timezone.now()
    overview = Overview()
    if _can(request, "leases.view_memberlease"):
        _lease_figures(overview, now)
        overview.charts.append((_("Leases per status, last 30 days"), leases_per_status_chart(now)))
    if _can(request, "leases.view_team"):
        _team_figures_and_chart(overview)
    if _can(request, "leasesite.view_alertstate"):
        _orphans(overview)
    if _can(request, "tokens.view_baomingtoken"):
        _token_figures(overview)
    if _can(request, "tokens.view_refreshrun"):
        _runs(overview)
        overview.charts.insert(0, (_("Refresh outcomes, last 30 runs"), refresh_outcomes_chart()))
    if _can(request, "django_celery_beat.view_periodictask"):
        overview.next_runs = next_runs(now)
    return overview


# -- counts -------------------------------------------------------------------------------------------------
def _lease_figures(overview: Overview, now: datetime) -> None:
    from leases.models import LeaseStatus, MemberLease

    waiting = getattr(LeaseStatus, "WAITING", None)  # the waiting list, once leases can wait
    counts = MemberLease.objects.aggregate(
        failed=Count("pk", filter=Q(status=LeaseStatus.FAILED)),
        overdue=Count("pk", filter=Q(status=LeaseStatus.ACTIVE, expires_at__lte=now)),
        waiting=Count("pk", filter=Q(status=waiting)) if waiting else Count("pk", filter=Q(pk__in=[])),
    )
    changelist = reverse("admin:leases_memberlease_changelist")
    overview.figures.append(
        Figure(_("Failed leases (need a human)"), counts["failed"], f"{changelist}?status__exact=failed", True)
    )
    overview.figures.append(
        Figure(_("Leases overdue for transfer"), counts["overdue"], f"{changelist}?overdue=yes", True)
    )
    if waiting:
        overview.figures.append(
            Figure(_("Waiting leases"), counts["waiting"], f"{changelist}?status__exact={waiting}", False)
        )


def _team_figures_and_chart(overview: Overview) -> None:
    from leases.models import Team, TeamHealth
    from leases.selectors import team_seats_used

    # Seats used come from the teams' maintained counters: no count over the leases.
    teams = list(Team.objects.filter(is_active=True).defer("api_token").order_by("pool", "name"))
    troubled = sum(1 for team in teams if team.health != TeamHealth.HEALTHY or team.last_sync_error)
    url = reverse("admin:leases_team_changelist") + "?problem=yes"
    overview.figures.append(Figure(_("Teams unhealthy or failing to sync"), troubled, url, True))
    rows = [(team.name, team_seats_used(team), team.capacity) for team in teams[:CHART_TEAMS]]
    _pools(overview, teams)
    overview.charts.append(
        (
            _("Seats used per team"),
            svgcharts.usage_bars(
                rows, label=_("Seats used per team"), empty=_("No active teams."), used_label=_("used")
            ),
        )
    )


def _pools(overview: Overview, teams: list) -> None:
    """Seats per pool: what redemptions and the waiting list of each pool can still use."""
    from leases.models import LeaseStatus, MemberLease
    from leases.selectors import team_free_seats, team_seats_used

    waiting = dict(
        MemberLease.objects.filter(status=LeaseStatus.WAITING)
        .order_by()
        .values_list("pool")
        .annotate(n=Count("pk"))
        .values_list("pool", "n")
    )
    now = timezone.now()
    totals: dict[str, list[int]] = {}
    for team in teams:
        capacity, used, free = totals.setdefault(team.pool, [0, 0, 0])
        totals[team.pool] = [capacity + team.capacity, used + team_seats_used(team), free + team_free_seats(team, now)]
    changelist = reverse("admin:leases_team_changelist")
    for pool in sorted(set(totals) | set(waiting)):
        capacity, used, free = totals.get(pool, [0, 0, 0])
        overview.pools.append(PoolLine(pool, capacity, used, free, waiting.get(pool, 0), f"{changelist}?pool={pool}"))


def _orphans(overview: Overview) -> None:
    from leases.services.orphans import ORPHANS_ALERT_KEY
    from leasesite.models import AlertState

    state = AlertState.objects.filter(key=ORPHANS_ALERT_KEY, active=True).first()
    if state is None:
        return
    since = timezone.localtime(state.since).strftime("%Y-%m-%d %H:%M") if state.since else "-"
    overview.orphans = _("Orphan check findings since %(since)s: %(title)s") % {
        "since": since,
        "title": state.last_title or "-",
    }
    overview.orphans_url = reverse("admin:leasesite_alertstate_change", args=[state.pk])


def _token_figures(overview: Overview) -> None:
    from tokens.models import BaomingToken, TokenHealth

    counts = BaomingToken.objects.aggregate(
        suspect=Count("pk", filter=Q(suspect_count__gt=0)),
        failing=Count("pk", filter=Q(suspect_count=0, consecutive_failures__gt=0)),
    )
    changelist = reverse("admin:tokens_baomingtoken_changelist")
    overview.figures.append(
        Figure(_("Tokens failing"), counts["failing"], f"{changelist}?health={TokenHealth.FAILING}", True)
    )
    overview.figures.append(
        Figure(_("Tokens suspect (probably logged out)"), counts["suspect"], f"{changelist}?health=suspect", True)
    )


def _runs(overview: Overview) -> None:
    from tokens.models import RefreshRun, RunKind

    for kind in (RunKind.REFRESH, RunKind.CLEANUP):
        run = RefreshRun.objects.filter(kind=kind).order_by("-started_at", "-id").first()
        if run is None:
            overview.runs.append(RunLine(str(kind.label), "", _("never ran"), None, "", ""))
            continue
        summary = _("%(total)d checked, %(ok)d ok, %(failed)d failed, %(deleted)d deleted") % {
            "total": run.total,
            "ok": run.ok,
            "failed": run.failed,
            "deleted": run.deleted,
        }
        overview.runs.append(
            RunLine(
                str(kind.label),
                run.status,
                run.get_status_display(),
                run.started_at,
                summary,
                reverse("admin:tokens_refreshrun_change", args=[run.pk]),
            )
        )


def next_runs(now: datetime) -> list[NextRun]:
    """Every enabled periodic task with when beat sends it next (its schedule from its last run)."""
    from django_celery_beat.models import PeriodicTask

    tasks = (
        PeriodicTask.objects.filter(enabled=True)
        .select_related("interval", "crontab", "solar", "clocked")
        .order_by("name")
    )
    result = []
    for task in tasks:
        try:
            remaining = task.schedule.remaining_estimate(task.last_run_at or task.start_time or now)
            at: datetime | None = max(now, now + remaining)
        except Exception:  # noqa: BLE001 - a schedule beat cannot compute: shown as unknown, never a 500
            at = None
        if task.one_off and task.total_run_count:
            at = None
        result.append(
            NextRun(task.name, task.task, at, reverse("admin:django_celery_beat_periodictask_change", args=[task.pk]))
        )
    result.sort(key=lambda run: (run.at is None, run.at or now))
    return result


# -- charts ---------------------------------------------------------------------------------------------------
def refresh_outcomes_chart() -> SafeString:
    from tokens.models import RefreshRun, RunKind

    runs = list(
        RefreshRun.objects.filter(kind=RunKind.REFRESH)
        .order_by("-started_at", "-id")
        .values("id", "started_at", "ok", "failed", "invalid", "rate_limited")[:CHART_RUNS]
    )
    columns = [
        (
            f"#{run['id']} {timezone.localtime(run['started_at']).strftime('%m-%d %H:%M')}",
            {
                "ok": run["ok"],
                "failed": max(0, run["failed"] - run["invalid"]),
                "invalid": run["invalid"],
                "rate_limited": run["rate_limited"],
            },
        )
        for run in reversed(runs)
    ]
    segments = [
        svgcharts.Segment("ok", _("valid"), "#4caf50"),
        svgcharts.Segment("failed", _("failed"), "#e6a23c"),
        svgcharts.Segment("invalid", _("invalid"), "#c0392b"),
        svgcharts.Segment("rate_limited", _("rate limited"), "#8e44ad"),
    ]
    return svgcharts.stacked_bars(
        columns, segments, label=_("Refresh outcomes, last 30 runs"), empty=_("No refresh run yet.")
    )


STATUS_COLORS = {
    "waiting": "#95a5a6",
    "pending": "#f1c40f",
    "active": "#4caf50",
    "transferring": "#3a7bd5",
    "failed": "#c0392b",
    "cancelled": "#7f8c8d",
    "expired": "#bdc3c7",
}


def leases_per_status_chart(now: datetime) -> SafeString:
    return svgcharts.stacked_area(
        *leases_per_status(now), label=_("Leases per status, last 30 days"), empty=_("No leases yet.")
    )


def leases_per_status(now: datetime) -> tuple[list[str], dict[str, list[int]], list[svgcharts.Segment]]:
    """How many leases were in each open status at the end of each of the last 30 days.

    From today's counts, walking the status changes of the last 30 days backwards (undoing each
    one): two queries, the second streamed in chunks.
    """
    from leases.models import FINAL_STATUSES, LeaseEvent, LeaseStatus, MemberLease

    shown = [status for status in LeaseStatus if status not in FINAL_STATUSES]
    counts = dict.fromkeys((s.value for s in LeaseStatus), 0)
    for row in MemberLease.objects.order_by().values("status").annotate(n=Count("pk")):
        counts[row["status"]] = row["n"]
    today = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    # Day ends, newest first: now (today so far), then the end of yesterday, ...
    ends = [now] + [today - timedelta(days=n) for n in range(CHART_DAYS - 1)]
    changes = (
        LeaseEvent.objects.filter(created_at__gt=ends[-1])
        .exclude(to_status="")
        .exclude(to_status=F("from_status"))
        .order_by("-created_at", "-id")
        .values_list("created_at", "from_status", "to_status")
        .iterator(chunk_size=2000)
    )
    snapshots: list[dict[str, int]] = []
    pending_change = next(changes, None)
    for end in ends:
        while pending_change is not None and pending_change[0] > end:
            _at, before, after = pending_change
            counts[after] = counts.get(after, 0) - 1
            if before:
                counts[before] = counts.get(before, 0) + 1
            pending_change = next(changes, None)
        snapshots.append(dict(counts))
    snapshots.reverse()
    # A day boundary (midnight) closes the day before it.
    day_labels = [timezone.localtime(end - timedelta(seconds=1)).strftime("%m-%d") for end in reversed(ends)]
    day_labels[-1] = _("now")
    series = {status.value: [max(0, snap.get(status.value, 0)) for snap in snapshots] for status in shown}
    segments = [svgcharts.Segment(s.value, str(s.label), STATUS_COLORS.get(s.value, "#999")) for s in shown]
    return day_labels, series, segments
