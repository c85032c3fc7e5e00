"""Exit 0 when the database, Redis, a worker and beat are fine; otherwise 1 and one line per problem."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _

from leasesite.health import CHECKS, health_problems


def check_names(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in CHECKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(CHECKS)} (comma-separated), got {value!r}")
    return names


class Command(BaseCommand):
    help = "Check the database, Redis, a Celery worker (ping) and beat (its heartbeat). Exit 1 on any problem."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--only", type=check_names, default=CHECKS, help=f"checks to run, comma-separated: {','.join(CHECKS)}"
        )
        parser.add_argument("--worker", metavar="NODE", help="ping this worker node only (e.g. celery@HOSTNAME)")

    def handle(self, *args: object, **options: object) -> None:
        problems = health_problems(only=options["only"], worker_node=options["worker"])
        if problems:
            for line in problems:
                self.stderr.write(line)
            raise CommandError(_("%(count)d problem(s)") % {"count": len(problems)}, returncode=1)
        self.stdout.write(_("healthy: %(checks)s") % {"checks": ", ".join(options["only"])})
