from __future__ import annotations

import getpass
import sys

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.services.tokens import TokenValidationError, token_add


class Command(BaseCommand):
    help = (
        "Store one 报名工具 token. The token is read from standard input (pipe it in) or a hidden "
        "prompt, never from the command line, so it does not end up in shell history or ps."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--card-name", help="the card name (名片); prompted for if omitted on a terminal")
        parser.add_argument("--user-name", default="", help="the user's name")

    def handle(self, *args: object, **options: object) -> None:
        interactive = sys.stdin.isatty()
        card_name = options["card_name"]
        if not card_name:
            if not interactive:
                raise CommandError("--card-name is required when the token is piped in")
            card_name = input("Card name (名片): ")
        token = getpass.getpass("Token (hidden): ") if interactive else sys.stdin.readline()
        try:
            stored = token_add(card_name=card_name, user_name=options["user_name"], token=token)
        except TokenValidationError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"stored token #{stored.pk} for {stored.card_name} ({stored.masked_token})")
