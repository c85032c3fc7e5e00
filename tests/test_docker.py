"""The compose file and its environment example, parsed: what an operator deploys must hold together."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
SETTINGS = (Path(__file__).resolve().parent.parent / "leasesite" / "settings.py").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def test_compose_runs_the_whole_stack(compose):
    assert set(compose["services"]) == {"postgres", "redis", "migrate", "web", "worker", "beat"}
    commands = {name: service.get("command") for name, service in compose["services"].items()}
    assert (commands["web"], commands["worker"], commands["beat"], commands["migrate"]) == (
        ["web"],
        ["worker"],
        ["beat"],
        ["migrate"],
    )


def test_web_worker_and_beat_have_health_checks_that_run_our_checks(compose):
    services = compose["services"]
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    worker = " ".join(services["worker"]["healthcheck"]["test"])
    assert "check_health --only worker --worker celery@$$(hostname)" in worker
    beat = services["beat"]["healthcheck"]["test"]
    assert beat[-4:] == ["manage.py", "check_health", "--only", "beat"]
    for name in ("web", "worker", "beat"):
        assert services[name]["healthcheck"]["interval"]


def test_exactly_one_beat(compose):
    beat = compose["services"]["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in beat
    assert [name for name, service in compose["services"].items() if service.get("command") == ["beat"]] == ["beat"]


def test_the_app_services_share_the_production_environment(compose):
    for name in ("migrate", "web", "worker", "beat"):
        environment = compose["services"][name]["environment"]
        assert environment["DJANGO_DEBUG"] == "false"
        assert environment["CELERY_BROKER_URL"].startswith("redis://redis:6379/")
        assert environment["DATABASE_URL"].startswith("postgres://")
        assert compose["services"][name]["env_file"] == ".env"


def test_every_variable_of_the_env_example_is_one_the_app_reads():
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (DOCKER / "env.example").read_text(), flags=re.MULTILINE)
    assert "METRICS_TOKEN" in names
    unknown = [name for name in names if name != "POSTGRES_PASSWORD" and f'"{name}"' not in SETTINGS]
    assert unknown == []


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed on this machine (the YAML checks above still ran)",
)
def test_docker_compose_accepts_the_file(tmp_path):
    env = tmp_path / ".env"
    env.write_text("POSTGRES_PASSWORD=x\n")
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yml"), "--env-file", str(env), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_web_and_workers_share_the_metrics_volume(compose):
    for name in ("migrate", "web", "worker"):
        service = compose["services"][name]
        root = service["environment"]["LEASESITE_METRICS_DIR"]
        assert f"metrics:{root}" in service["volumes"]
    assert "metrics" in compose["volumes"]


def test_the_entrypoint_gives_each_container_its_own_metrics_directory(tmp_path):
    """pids repeat across containers; one file per pid in one directory would mix two processes."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "old-container").mkdir()
    (shared / "old-container" / "counter_7.db").write_bytes(b"stale")
    env = {"PATH": "/usr/bin:/bin", "LEASESITE_METRICS_DIR": str(shared)}
    shown = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", 'echo "$PROMETHEUS_MULTIPROC_DIR"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    assert shown == f"{shared}/{hostname}"
    assert Path(shown).is_dir()
    assert (shared / "old-container" / "counter_7.db").exists()  # only migrate clears the volume


def test_the_worker_command_consumes_the_queues_it_is_given(tmp_path):
    """CELERY_WORKER_QUEUES makes a dedicated worker (docs/SCALING.md); unset, no -Q at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "celery"
    fake.write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n')
    fake.chmod(0o755)

    def worker_args(**env: str) -> list[str]:
        return subprocess.run(
            ["sh", str(DOCKER / "entrypoint.sh"), "worker"],
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")[:-1]

    assert "-Q" not in worker_args()
    dedicated = worker_args(CELERY_WORKER_QUEUES="leasesite-refresh")
    assert dedicated[dedicated.index("-Q") + 1] == "leasesite-refresh"
