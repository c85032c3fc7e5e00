"""Start the whole thing on one machine: web + worker + beat (embedded defaults), optional demo."""

from __future__ import annotations

import os
import secrets
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

DEMO_UPSTREAM_PORT = 8765
DEMO_PROVIDER_PORT = 8766


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
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args: object, **options: object) -> None:
        if options["demo"] and os.environ.get("DATABASE_URL"):
            raise CommandError("--demo uses its own SQLite database; unset DATABASE_URL to run the demo")
        env = dict(os.environ)
        metrics_env(env)
        if options["demo"]:
            env["DATABASE_URL"] = f"sqlite:///{Path(settings.VAR_DIR) / 'demo.sqlite3'}"
            env["BAOMING_API_BASE"] = f"http://127.0.0.1:{DEMO_UPSTREAM_PORT}"
            env["BAOMING_API_IS_FAKE"] = "true"  # the admin's scan page may "scan" the fake's QR codes
            env.setdefault("BAOMING_RATE_LIMIT", "5")
            env["DEMO_PROVIDER_PORT"] = str(DEMO_PROVIDER_PORT)
            # Re-run the setup steps against the demo database in a child with that environment.
            subprocess.check_call(
                [sys.executable, "manage.py", "start_prepare", "--demo"], cwd=settings.BASE_DIR, env=env
            )
        else:
            call_command("start_prepare")

        python = sys.executable
        children: list[tuple[str, subprocess.Popen]] = []
        if options["demo"]:
            children.append(
                (
                    "fake-upstream",
                    subprocess.Popen(
                        [
                            python,
                            "-m",
                            "leasesite.fakes.baoming_server",
                            "--port",
                            str(DEMO_UPSTREAM_PORT),
                            "--latency",
                            "0.05",
                            "--invalid-prefix",
                            "0",
                        ],
                        cwd=settings.BASE_DIR,
                        env=env,
                    ),
                )
            )
        if options["demo"]:
            children.append(
                (
                    "fake-team-provider",
                    subprocess.Popen(
                        [
                            python,
                            "-m",
                            "leasesite.fakes.team_provider_server",
                            "--port",
                            str(DEMO_PROVIDER_PORT),
                            "--latency",
                            "0.02",
                            "--auto-join-after",
                            "20",
                        ],
                        cwd=settings.BASE_DIR,
                        env=env,
                    ),
                )
            )
        children.append(
            (
                "web",
                subprocess.Popen(
                    [python, "manage.py", "runserver", f"{options['host']}:{options['port']}", "--noreload"],
                    cwd=settings.BASE_DIR,
                    env=env,
                ),
            )
        )
        children.append(
            (
                "worker+beat",
                subprocess.Popen(
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
                    cwd=settings.BASE_DIR,
                    env=env,
                ),
            )
        )
        self.stdout.write(
            self.style.SUCCESS(f"leasesite is up: http://{options['host']}:{options['port']}/admin/  (Ctrl-C stops)")
        )
        self._supervise(children)

    def _supervise(self, children: list[tuple[str, subprocess.Popen]]) -> None:
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        failed = None
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    failed = f"{name} exited with status {proc.returncode}"
                    stopping = True
                    break
            time.sleep(0.5)
        for _, proc in children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for _, proc in children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        if failed:
            raise CommandError(f"stopped: {failed}")
        self.stdout.write("stopped")


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


def ensure_admin_login(stdout) -> None:
    """Create the first admin with a random password, print it and keep it in var/ (mode 600)."""
    user_model = get_user_model()
    credentials = Path(settings.VAR_DIR) / "admin-login.txt"
    if user_model.objects.filter(is_superuser=True).exists():
        where = f" (first login saved in {credentials})" if credentials.exists() else ""
        stdout.write(f"admin login exists{where}; reset it with: python manage.py changepassword <user>")
        return
    password = secrets.token_urlsafe(12)
    user_model.objects.create_superuser("admin", "admin@localhost", password)
    credentials.write_text(f"user: admin\npassword: {password}\n")
    credentials.chmod(0o600)
    stdout.write(f"created admin login -> user: admin  password: {password}  (also in {credentials})")
