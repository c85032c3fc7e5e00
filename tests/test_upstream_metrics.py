"""Counters and the latency histogram of upstream calls, in one process and summed over several."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from leases.providers.http import HttpTeamProvider
from leasesite.metrics import metrics_render
from leasesite.upstream_metrics import upstream_metrics_register
from tests.conftest import invalid, new_token_value
from tests.leases.conftest import TEAM_TOKEN
from tokens.clients import BaomingClient

REPO = Path(__file__).resolve().parent.parent


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape() -> str:
    return metrics_render().decode()


@pytest.mark.django_db
def test_baoming_checks_are_counted_by_outcome_and_timed(upstream, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    client = BaomingClient(base_url=upstream.url, timeout=2)
    host = upstream.url.split("//", 1)[1]
    before = scrape()
    for _ in range(3):
        client.check_token(new_token_value())
    bad = new_token_value()
    upstream.answers[bad] = invalid
    client.check_token(bad)
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    counted = {"upstream": "baoming", "host": host, "call": "check"}
    assert delta("leasesite_upstream_requests_total", **counted, outcome="valid") == 3
    assert delta("leasesite_upstream_requests_total", **counted, outcome="invalid") == 1
    assert delta("leasesite_upstream_request_duration_seconds_count", **counted) == 4
    assert delta("leasesite_upstream_request_duration_seconds_sum", **counted) > 0
    assert bad not in after  # labels never carry a token


@pytest.mark.django_db
def test_provider_calls_are_counted_by_call_without_ids(provider, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    api = HttpTeamProvider(api_base=provider.team_url("alpha"), api_token=TEAM_TOKEN)
    before = scrape()
    api.invite("someone@example.com")
    api.list_members()
    after = scrape()
    posts = sample(after, "leasesite_upstream_requests_total", upstream="provider", outcome="ok")
    assert posts - sample(before, "leasesite_upstream_requests_total", upstream="provider", outcome="ok") == 2
    assert "someone@example.com" not in after
    calls = {
        s.labels["call"]
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if s.labels.get("upstream") == "provider"
    }
    assert calls and all(" " in c and "/" not in c.split(" ", 1)[1] for c in calls), calls


@pytest.mark.django_db
def test_provider_failures_are_counted_as_what_they_were(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = HttpTeamProvider(api_base=f"http://127.0.0.1:{port}/teams/x", api_token=TEAM_TOKEN, timeout=1)
    before = scrape()
    with pytest.raises(Exception, match="connection error"):
        api.list_members()
    after = scrape()
    labels = {"upstream": "provider", "host": f"127.0.0.1:{port}", "outcome": "connection_error"}
    assert (
        sample(after, "leasesite_upstream_requests_total", **labels)
        - sample(before, "leasesite_upstream_requests_total", **labels)
        == 1
    )


CHECKER = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    from tokens.clients import BaomingClient
    client = BaomingClient(base_url=sys.argv[1], timeout=5)
    for n in range(int(sys.argv[2])):
        client.check_token(f"multiprocess-token-{sys.argv[3]}-{n:04d}-padding-padding")
    """
)


@pytest.mark.django_db
@pytest.mark.parametrize("layout", ["one host", "two containers"])
def test_several_processes_are_summed_in_multiprocess_mode(upstream, tmp_path, layout):
    """Two worker-like processes count their calls into files; a scrape sums them. In the compose
    layout each container writes below a shared LEASESITE_METRICS_DIR in a directory of its own."""
    base = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings")
    base.pop("LEASESITE_METRICS_DIR", None)
    if layout == "one host":
        dirs = [tmp_path, tmp_path]
        env = dict(base, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    else:
        dirs = [tmp_path / "worker-1", tmp_path / "worker-2"]
        env = dict(base, LEASESITE_METRICS_DIR=str(tmp_path), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "web-1"))
    for d in [*dirs, Path(env["PROMETHEUS_MULTIPROC_DIR"])]:
        d.mkdir(exist_ok=True)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CHECKER, upstream.url, str(count), str(n)],
            cwd=REPO,
            env=dict(env, PROMETHEUS_MULTIPROC_DIR=str(directory)),
        )
        for n, (count, directory) in enumerate(zip((5, 7), dirs, strict=True))
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    assert len(list(tmp_path.rglob("*.db"))) >= 2  # one file set per process

    render = textwrap.dedent(
        """
        from prometheus_client import CollectorRegistry, generate_latest
        from leasesite.upstream_metrics import upstream_metrics_register
        registry = CollectorRegistry()
        upstream_metrics_register(registry)
        print(generate_latest(registry).decode())
        """
    )
    scraped = subprocess.run(
        [sys.executable, "-c", render], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    labels = {"upstream": "baoming", "call": "check", "outcome": "valid"}
    assert sample(scraped, "leasesite_upstream_requests_total", **labels) == 12
    assert sample(scraped, "leasesite_upstream_request_duration_seconds_count", upstream="baoming") == 12
    assert len(upstream.requests) == 12


def test_without_multiprocess_mode_the_process_own_metrics_are_registered(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = CollectorRegistry()
    upstream_metrics_register(registry)
    text = generate_latest(registry).decode()
    assert "# TYPE leasesite_upstream_requests_total counter" in text
    assert "# TYPE leasesite_upstream_request_duration_seconds histogram" in text
