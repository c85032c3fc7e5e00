from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

pytestmark = pytest.mark.django_db


def test_start_prepare_creates_one_admin_login_and_prints_it(settings, tmp_path, capsys):
    settings.VAR_DIR = tmp_path
    call_command("start_prepare")
    out = capsys.readouterr().out
    saved = (tmp_path / "admin-login.txt").read_text()
    password = saved.split("password: ")[1].strip()
    assert f"password: {password}" in out
    assert (tmp_path / "admin-login.txt").stat().st_mode & 0o777 == 0o600
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(password)

    call_command("start_prepare")
    assert "admin login exists" in capsys.readouterr().out
    assert get_user_model().objects.count() == 1


def test_start_refuses_demo_on_a_configured_database(monkeypatch):
    from django.core.management.base import CommandError

    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/real")
    with pytest.raises(CommandError, match="--demo uses its own SQLite database"):
        call_command("start", "--demo")


def test_start_gives_its_processes_a_fresh_shared_metrics_directory(settings, tmp_path):
    from leasesite.management.commands.start import metrics_env

    settings.VAR_DIR = tmp_path
    stale = tmp_path / "metrics" / "local" / "counter_1.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier start")
    env: dict[str, str] = {}
    metrics_env(env)
    assert env["LEASESITE_METRICS_DIR"] == str(tmp_path / "metrics")
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics" / "local")
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir() and not stale.exists()

    chosen = {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}
    metrics_env(chosen)
    assert chosen == {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}


# --- start as a newcomer meets it: ports, readiness, children that never outlive it ---------------

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def process_alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_start_stops_before_anything_when_its_port_is_taken(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError) as caught:
            call_command("start", "--port", str(port))
    message = str(caught.value)
    assert f"port {port} on 127.0.0.1 is in use" in message
    assert "choose another with --port " in message
    assert not get_user_model().objects.exists()  # start_prepare did not run
    assert not (tmp_path / "admin-login.txt").exists()


def test_start_refuses_a_port_out_of_range_before_starting_anything(settings, tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings.VAR_DIR = tmp_path
    with pytest.raises(CommandError, match=r"--upstream-port.*1 to 65535, got 99999999"):
        call_command("start", "--demo", "--upstream-port", "99999999")
    with pytest.raises(CommandError, match=r"--provider-port must be a whole number from 1 to 65535, got 0"):
        call_command("start", demo=True, provider_port=0)
    with pytest.raises(CommandError, match=r"--port and --upstream-port are both 8765"):
        call_command("start", "--demo", "--port", "8765")
    assert list(tmp_path.iterdir()) == []  # no database, no login file, no metrics directory


def test_die_with_parent_takes_the_child_down_when_the_parent_is_killed():
    parent_code = (
        "import subprocess, sys, time\n"
        "from leasesite.processes import die_with_parent\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
        "bound = subprocess.Popen(sleeper, preexec_fn=die_with_parent)\n"
        "free = subprocess.Popen(sleeper)\n"
        "print(bound.pid, free.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    bound, free = (int(pid) for pid in parent.stdout.readline().split())
    try:
        assert process_alive(bound) and process_alive(free)
        parent.kill()  # SIGKILL: the parent cannot clean up anything
        parent.wait(timeout=5)
        assert wait_until(lambda: not process_alive(bound), 5), "the child outlived its SIGKILLed parent"
        assert process_alive(free)  # without die_with_parent it would have stayed: the test shows the difference
    finally:
        for pid in (bound, free):
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.stdout.close()


def test_start_demo_end_to_end_on_free_ports(tmp_path):
    web, upstream, provider = free_ports(3)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "LEASESITE_METRICS_DIR")
        and not key.startswith("CELERY_")
    }
    env.update(DJANGO_SETTINGS_MODULE="leasesite.settings", LEASESITE_VAR_DIR=str(tmp_path), LEASESITE_NO_VENV="1")
    argv = [sys.executable, "manage.py", "start", "--demo", "--port", str(web)]
    argv += ["--upstream-port", str(upstream), "--provider-port", str(provider), "--ready-timeout", "40"]
    supervisor = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(supervisor.stdout), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any("leasesite is up" in line for line in lines) or supervisor.poll() is not None, 45)
        output = "".join(lines)
        assert f"leasesite is up: http://127.0.0.1:{web}/admin/" in output, output[-3000:]
        connection = http.client.HTTPConnection("127.0.0.1", web, timeout=5)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()

        login = tmp_path / "demo-admin-login.txt"
        assert login.stat().st_mode & 0o777 == 0o600
        assert "password: " in login.read_text()
        assert not (tmp_path / "admin-login.txt").exists()  # the normal login file is not the demo's

        assert wait_until(lambda: any("run commands against it" in line for line in lines), 5)
        hint = next(line for line in lines if "run commands against it" in line)
        assert "manage.py check_health" in hint
        assert ".venv/bin/python manage.py" in hint or f"{sys.executable} manage.py" in hint
        assert f"DATABASE_URL=sqlite:///{tmp_path / 'demo.sqlite3'}" in hint
        assert "No hostname was supplied" not in "".join(lines)  # silenced under start

        children = descendants(supervisor.pid)
        assert len(children) >= 4  # two fakes, web, worker (+ its embedded beat)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert wait_until(lambda: not any(process_alive(pid) for pid in children), 10)
        reader.join(timeout=5)
        assert lines[-1].strip() == "stopped"
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
