from __future__ import annotations

import getpass
import sys

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.management.commands._args import positive_int
from leases.models import Team
from leases.providers import PROVIDER_CHOICES


class Command(BaseCommand):
    help = (
        "Add (or update) a team. The API token is read from standard input when piped, or asked for "
        "without echo; it is never a command-line argument (shell history, ps)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--api-base", required=True, metavar="URL")
        parser.add_argument("--capacity", type=positive_int, required=True, metavar="SEATS")
        parser.add_argument("--provider", default="http", choices=[c for c, _ in PROVIDER_CHOICES])
        parser.add_argument("--no-token", action="store_true", help="the provider needs no API token")

    def handle(self, *args: object, **options: object) -> None:
        token = ""
        if not options["no_token"]:
            token = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("API token: ").strip()
            if not token:
                raise CommandError("no API token given (pipe it on standard input, or pass --no-token)")
        team = Team.objects.filter(name=options["name"]).first() or Team(name=options["name"])
        team.api_base = options["api_base"]
        team.capacity = options["capacity"]
        team.provider = options["provider"]
        team.api_token = token
        try:
            team.full_clean()
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        created = team.pk is None
        team.save()
        self.stdout.write(f"{'added' if created else 'updated'} team {team.name} ({team.capacity} seats)")
