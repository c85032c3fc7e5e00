from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from leases.management.commands._args import email_arg
from leases.models import Team
from leases.services.sync import joins_sync


class Command(BaseCommand):
    help = "Join sync: read each team's members and invites and activate the pending leases that joined."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--team", metavar="NAME", help="only this team")
        parser.add_argument("--email", type=email_arg, metavar="EMAIL", help="only this customer's lease")

    def handle(self, *args: object, **options: object) -> None:
        name = options["team"]
        if name is not None and not Team.objects.filter(name=name).exists():
            known = ", ".join(Team.objects.order_by("name").values_list("name", flat=True)) or "none"
            raise CommandError(f"no team named {name!r} (teams: {known})")
        results = joins_sync(team_name=name, email=options["email"])
        if not results:
            self.stdout.write("nothing to sync")
            return
        failed = 0
        for r in results:
            if r.ok:
                self.stdout.write(
                    f"{r.team}: {r.members} member(s), {r.invites} invite(s), {r.pending} pending lease(s): "
                    f"{r.joined} joined, {r.missing} missing, {r.reinvited} re-invited, {r.invited} invited "
                    f"({r.provider_calls} provider call(s))"
                )
            else:
                failed += 1
                self.stderr.write(f"{r.team}: {r.skipped or r.error}")
        if failed:
            raise CommandError(f"{failed} team(s) not synced")
