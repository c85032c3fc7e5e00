"""Django's ``check``, with the database named by default.

Plain ``manage.py check`` runs as ``check --database default``, so it includes the database
checks — among them ``leasesite.E002`` (stored secrets no configured key decrypts). Django's own
database checks cope with an unreachable database, and so does ours (a warning); a SQLite file
that does not exist yet is left alone (connecting would create it). Other commands keep Django's
default and never read the database before they run.
"""

from __future__ import annotations

from django.core.management.commands.check import Command as DjangoCheckCommand
from django.db import DEFAULT_DB_ALIAS

from leasesite.checks import database_missing


class Command(DjangoCheckCommand):
    help = DjangoCheckCommand.help + " Reads the default database unless --database names others."

    def handle(self, *app_labels: str, **options: object) -> None:
        if not options.get("databases") and not database_missing(DEFAULT_DB_ALIAS):
            options["databases"] = [DEFAULT_DB_ALIAS]
        super().handle(*app_labels, **options)
