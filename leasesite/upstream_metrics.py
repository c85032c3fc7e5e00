"""Counters and a latency histogram of every upstream call (报名工具 and team providers).

Correct across processes with prometheus-client's multiprocess mode: when the environment sets
``PROMETHEUS_MULTIPROC_DIR``, each process writes its counts to files there (named by pid) and
``/metrics`` sums them. Several hosts or containers share one volume through
``LEASESITE_METRICS_DIR``: each gives its processes a subdirectory of its own (pids repeat across
containers, files must not) and a scrape sums every file under it — ``start`` and the compose file
set both. Without either, ``/metrics`` shows only the answering process's own calls.
Only counters and histograms live here: they need no "dead process" bookkeeping (a dead
process's counts stay in the sum, as a counter's must).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Created unregistered: /metrics builds a fresh registry per scrape (leasesite.metrics).
UPSTREAM_REQUESTS = Counter(
    "leasesite_upstream_requests",
    "Calls to upstream APIs by upstream, host, call and outcome",
    ["upstream", "host", "call", "outcome"],
    registry=None,
)
UPSTREAM_DURATION = Histogram(
    "leasesite_upstream_request_duration_seconds",
    "Seconds per upstream call (from sending to the whole answer read), by upstream, host and call",
    ["upstream", "host", "call"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=None,
)


def upstream_host(url: str) -> str:
    """The host:port of a base URL: bounded label values, and never a path or query (secrets travel there)."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1] or "unknown"


def upstream_call_observe(*, upstream: str, host: str, call: str, outcome: str, seconds: float | None) -> None:
    UPSTREAM_REQUESTS.labels(upstream, host, call, outcome).inc()
    if seconds is not None:
        UPSTREAM_DURATION.labels(upstream, host, call).observe(seconds)


def metrics_root() -> str:
    """The directory whose metric files a scrape sums: the shared root, else this host's own."""
    return os.environ.get("LEASESITE_METRICS_DIR", "") or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


class SharedFilesCollector(Collector):
    """prometheus-client's multiprocess sum, over every ``*.db`` file below the root (all hosts)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def collect(self) -> Iterator[Metric]:
        files = sorted(str(path) for path in self.root.rglob("*.db"))
        return iter(MultiProcessCollector.merge(files, accumulate=True))


def upstream_metrics_register(registry: CollectorRegistry) -> None:
    root = metrics_root()
    if root:
        registry.register(SharedFilesCollector(root))
    else:
        registry.register(UPSTREAM_REQUESTS)
        registry.register(UPSTREAM_DURATION)
