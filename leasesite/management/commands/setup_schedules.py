from __future__ import annotations

from django.core.management.base import BaseCommand

from leasesite.schedules import schedules_install


class Command(BaseCommand):
    help = "Install the default beat schedules (idempotent; keeps what operators changed in the admin)."

    def handle(self, *args: object, **options: object) -> None:
        created, present = schedules_install()
        self.stdout.write(f"default schedules: {created} created, {present} already present")
