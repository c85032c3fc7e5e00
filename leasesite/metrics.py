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


def metrics_render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TokenCollector())
    return generate_latest(registry)
