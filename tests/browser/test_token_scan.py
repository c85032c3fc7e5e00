"""An operator adds a token by scanning the QR code in the admin (the demo's fake "scan" button),
with a real Celery worker polling the bundled fake 报名工具 server."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from tests.browser.conftest import admin_login, save_screenshot
from tests.integration.conftest import start_workers  # noqa: F401 - the fixture
from tests.tokens import qr_fixtures
from tokens.models import BaomingToken

fake_baoming = qr_fixtures.fake_baoming
pytestmark = pytest.mark.django_db(transaction=True)


def test_scan_add_a_token_in_the_demo(page, live_server, fake_baoming, start_workers, settings):  # noqa: F811
    start_workers(1, BAOMING_API_BASE=fake_baoming.url)
    # As start --demo sets them (after start_workers, whose environment fixture points the app at
    # another fake): the page offers the fake's "scan" button.
    settings.BAOMING_API_BASE = fake_baoming.url
    settings.BAOMING_API_IS_FAKE = True
    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    admin_login(page, live_server, "ops", "pw-ops-123456")
    page.goto(f"{live_server.url}/admin/tokens/baomingtoken/")
    page.get_by_text("扫码添加 Token").first.click()
    page.fill("input[name=card_name]", "张三")
    page.locator("form input[type=submit]").first.click()
    page.wait_for_selector(".segno", timeout=90_000)  # the QR code, once the worker fetched it
    save_screenshot(page, "token-scan")
    page.locator("input[type=submit][value*='模拟扫码']").click()
    page.wait_for_url("**/admin/tokens/baomingtoken/*/change/", timeout=90_000)
    token = BaomingToken.objects.get()
    assert token.card_name == "张三"
    assert token.token not in page.content()  # the new token's page shows it masked only
