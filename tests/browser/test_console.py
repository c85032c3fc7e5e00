"""An operator in the browser: sees trouble on the overview and fixes it from the lease's page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from leases.models import LeaseStatus, TeamHealth
from tests.browser.conftest import admin_login, save_screenshot
from tokens.models import RefreshRun, RunKind, RunStatus, RunTrigger

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def troubled_world(make_team, make_lease, make_token):
    now = timezone.now()
    alpha = make_team("团队 A", capacity=5)
    beta = make_team("团队 B", capacity=5)
    dead = make_team("团队 C", capacity=3)
    dead.health = TeamHealth.DEAD
    dead.health_reason = "GET members: HTTP 401"
    dead.save(update_fields=["health", "health_reason"])
    for n in range(3):
        make_lease(alpha, LeaseStatus.ACTIVE, email=f"active{n}@example.com")
    failed = make_lease(
        alpha,
        LeaseStatus.FAILED,
        email="bob@example.com",
        transfer_team=beta,
        last_error="POST invites to 团队 B: HTTP 500",
    )
    for n in range(12):
        RefreshRun.objects.create(
            kind=RunKind.REFRESH,
            trigger=RunTrigger.BEAT,
            status=RunStatus.SUCCEEDED,
            started_at=now - timedelta(hours=n),
            total=20,
            ok=17 - n % 3,
            failed=3 + n % 3,
            invalid=n % 2,
        )
    make_token(consecutive_failures=2, last_checked_at=now)
    return {"failed": failed, "alpha": alpha, "beta": beta}


def test_the_overview_shows_the_failed_lease(page, live_server, troubled_world):
    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    admin_login(page, live_server, "ops", "pw-ops-123456")
    assert page.title().endswith("leasesite 控制台")
    figure = page.locator(".overview-figures a", has_text="需人工处理的失败租约")
    assert figure.locator(".count").inner_text() == "1"
    save_screenshot(page, "overview")
    figure.click()
    page.wait_for_selector("#result_list")
    assert "bob@example.com" in page.locator("#result_list").inner_text()
