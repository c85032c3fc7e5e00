"""Prometheus metrics computed from the database at scrape time.

Reading the database (not per-process counters) gives one consistent picture across any number
of web and worker processes without prometheus_client's multiprocess directory.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Q
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from leasesite.upstream_metrics import upstream_metrics_register


class TokenCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from tokens.models import BaomingToken, RunKind
        from tokens.selectors import runs_latest_finished

        counts = BaomingToken.objects.aggregate(
            total=Count("id"), failing=Count("id", filter=Q(consecutive_failures__gt=0))
        )
        tokens = GaugeMetricFamily("leasesite_baoming_tokens", "Stored 报名工具 tokens", labels=["state"])
        tokens.add_metric(["all"], counts["total"])
        tokens.add_metric(["failing"], counts["failing"])
        yield tokens

        for kind in (RunKind.REFRESH, RunKind.CLEANUP):
            run = runs_latest_finished(kind=kind)
            if run is None:
                continue
            finished = GaugeMetricFamily(
                f"leasesite_token_{kind}_last_run_timestamp_seconds",
                f"End of the latest finished token {kind} run",
                labels=["status"],
            )
            finished.add_metric([run.status], run.ended_at.timestamp() if run.ended_at else 0)
            yield finished
            stats = GaugeMetricFamily(
                f"leasesite_token_{kind}_last_run_tokens",
                f"Statistics of the latest finished token {kind} run",
                labels=["result"],
            )
            for field in ("total", "ok", "failed", "invalid", "deleted", "rate_limited"):
                stats.add_metric([field], getattr(run, field))
            yield stats
            duration = GaugeMetricFamily(
                f"leasesite_token_{kind}_last_run_duration_seconds", f"Duration of the latest token {kind} run"
            )
            duration.add_metric([], run.duration_seconds or 0.0)
            yield duration


class LeaseCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.utils import timezone

        from leases.models import LeaseStatus, MemberLease, Team
        from leases.selectors import team_seats_used, teams_with_seat_usage

        by_status = dict(MemberLease.objects.order_by().values_list("status").annotate(n=Count("id")))
        leases = GaugeMetricFamily("leasesite_leases", "Member leases by status", labels=["status"])
        for status in LeaseStatus:
            leases.add_metric([status.value], by_status.get(status.value, 0))
        yield leases
        overdue = GaugeMetricFamily(
            "leasesite_leases_overdue", "Active leases past expires_at (waiting for the transfer executor)"
        )
        overdue.add_metric(
            [], MemberLease.objects.filter(status=LeaseStatus.ACTIVE, expires_at__lte=timezone.now()).count()
        )
        yield overdue
        seats = GaugeMetricFamily("leasesite_team_seats", "Seats per active team", labels=["team", "kind"])
        synced = GaugeMetricFamily(
            "leasesite_team_last_sync_timestamp_seconds", "Last successful join sync per team", labels=["team"]
        )
        health = GaugeMetricFamily(
            "leasesite_team_health", "1 for each active team's current health", labels=["team", "pool", "health"]
        )
        for team in teams_with_seat_usage(Team.objects.filter(is_active=True).defer("api_token")):
            seats.add_metric([team.name, "capacity"], team.capacity)
            seats.add_metric([team.name, "used"], team_seats_used(team))
            health.add_metric([team.name, team.pool, team.health], 1)
            if team.last_synced_at:
                synced.add_metric([team.name], team.last_synced_at.timestamp())
        yield seats
        yield synced
        yield health


class JobCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from leasesite.jobs import job_last_successes

        last = GaugeMetricFamily(
            "leasesite_job_last_success_timestamp_seconds",
            "When each periodic job last ended without an error (leasesite.heartbeat: beat's pulse)",
            labels=["task"],
        )
        for task, at in sorted(job_last_successes().items()):
            last.add_metric([task], at.timestamp())
        yield last


def metrics_render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TokenCollector())
    registry.register(LeaseCollector())
    registry.register(JobCollector())
    upstream_metrics_register(registry)
    return generate_latest(registry)
