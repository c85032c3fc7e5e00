"""Start the whole thing on one machine: web + worker + beat (embedded defaults), optional demo."""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from leasesite.processes import bind_error, die_with_parent, http_get_status, port_in_use

DEMO_UPSTREAM_PORT = 8765
DEMO_PROVIDER_PORT = 8766
FAKES_HOST = "127.0.0.1"  # the fake servers' own default --host
ADMIN_LOGIN_FILE = "admin-login.txt"
DEMO_ADMIN_LOGIN_FILE = "demo-admin-login.txt"


def port_number(value: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got {port}")
    return port


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds above 0, got {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds above 0, got {value}")
    return seconds


class Command(BaseCommand):
    help = (
        "Migrate, install default schedules, make sure an admin login exists (printed once), then run "
        "the web server, one Celery worker with beat embedded and, with --demo, a local fake 报名工具 "
        "API with demo tokens. Ctrl-C stops everything."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--demo",
            action="store_true",
            help="seed demo tokens, teams and codes; run local fake 报名工具 and team provider APIs",
        )
        parser.add_argument("--host", default="127.0.0.1", help="address the web server listens on")
        parser.add_argument("--port", type=port_number, default=8000, help="web server port (default 8000)")
        parser.add_argument(
            "--upstream-port",
            type=port_number,
            default=DEMO_UPSTREAM_PORT,
            help=f"with --demo: port of the fake 报名工具 API (default {DEMO_UPSTREAM_PORT})",
        )
        parser.add_argument(
            "--provider-port",
            type=port_number,
            default=DEMO_PROVIDER_PORT,
            help=f"with --demo: port of the fake team provider (default {DEMO_PROVIDER_PORT})",
        )
        parser.add_argument(
            "--ready-timeout",
            type=positive_seconds,
            default=60.0,
            help="seconds to wait for the web server to answer /healthz before giving up (default 60)",
        )

    def handle(self, *args: object, **options: object) -> None:
        demo = bool(options["demo"])
        host = str(options["host"])
        if demo and os.environ.get("DATABASE_URL"):
            raise CommandError("--demo uses its own SQLite database; unset DATABASE_URL to run the demo")
        ready_timeout = options["ready_timeout"]
        if not isinstance(ready_timeout, int | float) or not 0 < ready_timeout < float("inf"):
            raise CommandError(f"--ready-timeout must be seconds above 0, got {ready_timeout}")
        ports = self._check_ports(host, options, demo)

        env = dict(os.environ)
        env["LEASESITE_SUPERVISED"] = "1"  # children leave out start-up noise (leasesite.celery)
        metrics_env(env)
        if demo:
            env["DATABASE_URL"] = demo_database_url()
            env["BAOMING_API_BASE"] = f"http://{FAKES_HOST}:{ports['--upstream-port']}"
            env["BAOMING_API_IS_FAKE"] = "true"  # the admin's scan page may "scan" the fake's QR codes
            env.setdefault("BAOMING_RATE_LIMIT", "5")
            # One person tries many codes from one browser in the demo (production default: 10).
            env.setdefault("LEASE_REDEEM_RATE_LIMIT", "100")
            env["DEMO_PROVIDER_PORT"] = str(ports["--provider-port"])  # settings.DEMO_PROVIDER_PORT: demo teams
            # Re-run the setup steps against the demo database in a child with that environment.
            status = subprocess.call(
                [sys.executable, "manage.py", "start_prepare", "--demo"],
                cwd=settings.BASE_DIR,
                env=env,
                preexec_fn=die_with_parent,
            )
            if status:
                raise CommandError(f"preparing the demo database failed (exit status {status}); see above")
        else:
            call_command("start_prepare")

        supervisor = Supervisor(self)
        supervisor.run(self._children(host, ports, env, demo), host, ports["--port"], ready_timeout, demo)

    def _check_ports(self, host: str, options: dict, demo: bool) -> dict[str, int]:
        """Every port this start will bind, checked before anything starts."""
        ports = {"--port": options["port"]}
        if demo:
            ports["--upstream-port"] = options["upstream_port"]
            ports["--provider-port"] = options["provider_port"]
        for flag, port in ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise CommandError(f"{flag} must be a whole number from 1 to 65535, got {port}")
        flags_of: dict[int, list[str]] = {}
        for flag, port in ports.items():
            flags_of.setdefault(port, []).append(flag)
        for port, flags in flags_of.items():
            if len(flags) > 1:
                raise CommandError(f"{' and '.join(flags)} are both {port}; give each its own port")
        problems = []
        avoid = set(ports.values())
        for flag, port in ports.items():
            where = host if flag == "--port" else FAKES_HOST
            error = bind_error(where, port)
            if error is None:
                continue
            instead = free_port_after(where, port, avoid)
            avoid.add(instead)
            if error.errno == errno.EADDRINUSE:
                other = "another leasesite?" if flag == "--port" else "another leasesite demo?"
                problems.append(f"port {port} on {where} is in use ({other}); choose another with {flag} {instead}")
            elif error.errno == errno.EACCES:
                problems.append(f"port {port} on {where} needs more privileges; choose another with {flag} {instead}")
            else:
                reason = error.strerror or str(error)
                problems.append(f"cannot listen on {where} port {port} ({reason}); check --host")
        if problems:
            raise CommandError("; ".join(problems))
        return ports

    def _children(self, host: str, ports: dict[str, int], env: dict[str, str], demo: bool) -> list[Child]:
        python = sys.executable
        children = []
        if demo:
            children.append(
                Child(
                    "fake-upstream",
                    [
                        python,
                        "-m",
                        "leasesite.fakes.baoming_server",
                        "--host",
                        FAKES_HOST,
                        "--port",
                        str(ports["--upstream-port"]),
                        "--latency",
                        "0.05",
                        "--invalid-prefix",
                        "0",
                    ],
                )
            )
            children.append(
                Child(
                    "fake-team-provider",
                    [
                        python,
                        "-m",
                        "leasesite.fakes.team_provider_server",
                        "--host",
                        FAKES_HOST,
                        "--port",
                        str(ports["--provider-port"]),
                        "--latency",
                        "0.02",
                        "--auto-join-after",
                        "20",
                    ],
                )
            )
        address = (
            f"[{host}]:{ports['--port']}" if ":" in host and not host.startswith("[") else f"{host}:{ports['--port']}"
        )
        children.append(Child("web", [python, "manage.py", "runserver", address, "--noreload"]))
        children.append(
            Child(
                "worker+beat",
                [
                    python,
                    "-m",
                    "celery",
                    "-A",
                    "leasesite",
                    "worker",
                    "--beat",
                    "--pool=solo",
                    "--loglevel=INFO",
                    "--schedule",
                    str(Path(settings.VAR_DIR) / "celerybeat-schedule"),
                ],
            )
        )
        for child in children:
            child.env = env
        return children


class Child:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # Same process group as the supervisor (Ctrl-C in the terminal reaches every process at once);
        # PR_SET_PDEATHSIG: the child gets SIGTERM when the supervisor dies, even of SIGKILL.
        self.proc = subprocess.Popen(self.argv, cwd=settings.BASE_DIR, env=self.env, preexec_fn=die_with_parent)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class Supervisor:
    def __init__(self, command: Command) -> None:
        self.command = command
        self.stopping = False

    def say(self, text: str, style=None) -> None:
        self.command.stdout.write(style(text) if style else text)
        self.command.stdout.flush()

    def run(self, children: list[Child], host: str, port: int, ready_timeout: float, demo: bool) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stopping = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            failed = None
            try:
                for child in children:
                    child.start()
                failed = self._wait_ready(children, host, port, ready_timeout)
                if failed is None and not self.stopping:
                    self._say_up(host, port, demo)
                    failed = self._watch(children)
            finally:
                self._stop_all(children)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failed:
            raise CommandError(f"stopped: {failed}")
        self.say("stopped")

    def _first_exit(self, children: list[Child]) -> str | None:
        for child in children:
            status = child.exited()
            if status is not None:
                return f"{child.name} exited with status {status}"
        return None

    def _wait_ready(self, children: list[Child], host: str, port: int, timeout: float) -> str | None:
        """None once the web server answers /healthz with 200; else why not."""
        deadline = time.monotonic() + timeout
        last = None
        while not self.stopping:
            exited = self._first_exit(children)
            if exited:
                return f"{exited} before leasesite was up; its output is above"
            answer = http_get_status(host, port, "/healthz", timeout=min(2.0, timeout))
            if answer is not None:
                if answer[0] == 200:
                    return None
                last = answer
            if time.monotonic() >= deadline:
                said = f" (/healthz answered {last[0]}: {last[1].strip()[:200]})" if last else ""
                return (
                    f"the web server did not answer http://{host}:{port}/healthz within {timeout:g} s{said}; "
                    "wait longer with --ready-timeout"
                )
            time.sleep(0.25)
        return None

    def _say_up(self, host: str, port: int, demo: bool) -> None:
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.say(f"leasesite is up: http://{shown}:{port}/admin/  (Ctrl-C stops)", self.command.style.SUCCESS)
        if demo:
            login = Path(settings.VAR_DIR) / DEMO_ADMIN_LOGIN_FILE
            self.say(f"demo admin login: {login} (the demo's own; {ADMIN_LOGIN_FILE} is for the normal start)")
            self.say(
                "the demo has its own database; run commands against it, e.g.: "
                + manage_py_hint("check_health", demo=True)
            )
        else:
            self.say(f"run other commands with, e.g.: {manage_py_hint('check_health')}")

    def _watch(self, children: list[Child]) -> str | None:
        while not self.stopping:
            exited = self._first_exit(children)
            if exited:
                return exited
            time.sleep(0.5)
        return None

    def _stop_all(self, children: list[Child]) -> None:
        for child in children:
            if child.exited() is None and child.proc is not None:
                child.proc.terminate()
        deadline = time.monotonic() + 20
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def free_port_after(host: str, port: int, taken: set[int]) -> int:
    """A port to suggest instead of a busy one: the next free one above it (or below, at the top)."""
    candidates = [*range(port + 1, min(port + 50, 65536)), *range(port - 1, max(port - 50, 0), -1)]
    for candidate in candidates:
        if candidate not in taken and not port_in_use(host, candidate):
            return candidate
    return port + 1 if port < 65535 else port - 1


def demo_database_url() -> str:
    return f"sqlite:///{Path(settings.VAR_DIR) / 'demo.sqlite3'}"


def python_for_hints() -> str:
    """The interpreter as a newcomer should type it: ``.venv/bin/python`` in the checkout, else its path."""
    executable = Path(sys.executable).absolute()
    base = Path(settings.BASE_DIR).absolute()
    try:
        executable.relative_to(base / ".venv")
    except ValueError:
        return shlex.quote(str(executable))
    return shlex.quote(str(executable.relative_to(base)))


def manage_py_hint(*args: str, demo: bool = False) -> str:
    """A ``manage.py`` command line to print, with the demo's database when ``demo``."""
    prefix = ""
    if demo:
        prefix = f"DATABASE_URL={shlex.quote(demo_database_url())} "
        if os.environ.get("LEASESITE_VAR_DIR"):
            prefix += f"LEASESITE_VAR_DIR={shlex.quote(os.environ['LEASESITE_VAR_DIR'])} "
    return f"{prefix}{python_for_hints()} manage.py {' '.join(args)}"


def metrics_env(env: dict[str, str]) -> None:
    """Upstream-call counters shared by web and worker (prometheus-client multiprocess mode).

    Unless the caller chose a directory, a fresh one under the var directory: files of processes
    from an earlier start would otherwise be summed again (or reused by a new process's pid)."""
    if env.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    root = Path(env.get("LEASESITE_METRICS_DIR") or Path(settings.VAR_DIR) / "metrics")
    if not env.get("LEASESITE_METRICS_DIR"):
        shutil.rmtree(root, ignore_errors=True)
    own = root / "local"
    own.mkdir(parents=True, exist_ok=True)
    env["LEASESITE_METRICS_DIR"] = str(root)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(own)


def ensure_admin_login(stdout, demo: bool = False) -> None:
    """Create the first admin with a random password, print it and keep it in var/ (mode 600).

    The demo's database has its own admin, kept in its own file (``demo-admin-login.txt``)."""
    user_model = get_user_model()
    credentials = Path(settings.VAR_DIR) / (DEMO_ADMIN_LOGIN_FILE if demo else ADMIN_LOGIN_FILE)
    if user_model.objects.filter(is_superuser=True).exists():
        where = f" (first login saved in {credentials})" if credentials.exists() else ""
        reset = manage_py_hint("changepassword", "<user>", demo=demo)
        stdout.write(f"admin login exists{where}; reset it with: {reset}")
        return
    password = secrets.token_urlsafe(12)
    user_model.objects.create_superuser("admin", "admin@localhost", password)
    credentials.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f"user: admin\npassword: {password}\n")
    credentials.chmod(0o600)  # an existing file keeps its mode through os.open
    stdout.write(f"created admin login -> user: admin  password: {password}  (also in {credentials})")
