"""The setup half of ``start``: migrate, schedules, admin login, demo data."""

from __future__ import annotations

import secrets

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from leasesite.management.commands.start import ensure_admin_login
from leasesite.schedules import schedules_install

DEMO_CARDS = [
    "张三的名片",
    "李四的名片",
    "王五的名片",
    "赵六的名片",
    "钱七的名片",
    "孙八的名片",
    "周九的名片",
    "吴十的名片",
]


class Command(BaseCommand):
    help = "Migrate, install default schedules, ensure an admin login; with --demo also seed demo tokens."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--demo", action="store_true")

    def handle(self, *args: object, **options: object) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        created, present = schedules_install()
        self.stdout.write(f"database migrated; default schedules: {created} created, {present} present")
        ensure_admin_login(self.stdout, demo=options["demo"])
        if options["demo"]:
            self._seed_demo()

    def _seed_demo(self) -> None:
        from tokens.models import BaomingToken
        from tokens.tasks import refresh_tokens

        if not BaomingToken.objects.exists():
            for index, card in enumerate(DEMO_CARDS * 3):
                token = secrets.token_hex(16)
                # The demo upstream answers "invalid access_token" for tokens starting with 0.
                token = ("0" if index % 6 == 5 else "a") + token[1:]
                BaomingToken.objects.create(card_name=card, user_name=f"demo{index + 1}", token=token)
            self.stdout.write(f"seeded {BaomingToken.objects.count()} demo tokens (every 6th one is invalid)")
        refresh_tokens.delay(max_age_days=None, trigger="admin")
        self.stdout.write("queued a first refresh run: see Admin → refresh runs")
        self.stdout.write(
            "add a token by scanning: Admin → 报名工具 tokens → 扫码添加 Token, then 模拟扫码 (demo) "
            "plays the WeChat scan"
        )
        self._seed_demo_leases()

    def _seed_demo_leases(self) -> None:
        """Two teams on the local fake team provider, and a batch of codes to redeem."""
        from django.conf import settings

        from leases.models import RedemptionCode, Team
        from leases.services.redemption import codes_generate

        base = f"http://127.0.0.1:{settings.DEMO_PROVIDER_PORT}/teams"
        for name, capacity in (("demo-team-a", 5), ("demo-team-b", 5)):
            team, created = Team.objects.get_or_create(
                name=name,
                defaults={"provider": "http", "api_base": f"{base}/{name}/", "api_token": "demo", "capacity": capacity},
            )
            if not created and team.provider == "http" and team.api_base != f"{base}/{name}/":
                # An earlier demo ran its fake provider on another --provider-port.
                Team.objects.filter(pk=team.pk).update(api_base=f"{base}/{name}/")
        unused = RedemptionCode.objects.filter(batch="demo", redeemed_at__isnull=True)
        if not unused.exists():
            codes_generate(count=5, term_months=1, total_months=3, batch="demo")
        self.stdout.write("demo teams: demo-team-a, demo-team-b (fake provider; invites are accepted after 20 s)")
        codes = ", ".join(unused.values_list("code", flat=True))
        self.stdout.write(f"demo redemption codes (redeem one at /redeem/): {codes}")
