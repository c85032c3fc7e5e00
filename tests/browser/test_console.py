"""An operator in the browser: sees trouble on the overview and fixes it from the lease's page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
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
        last_error="邀请加入团队 团队 B 失败：POST invites: HTTP 500 — 当前所在团队：团队 A",
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


def test_an_operator_sees_the_failed_lease_and_fixes_it_in_three_clicks(page, live_server, troubled_world):
    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    admin_login(page, live_server, "ops", "pw-ops-123456")
    assert page.title().endswith("leasesite 控制台")
    figure = page.locator(".overview-figures a", has_text="需人工处理的失败租约")
    assert figure.locator(".count").inner_text() == "1"
    assert page.locator("svg.leasesite-chart").count() >= 3
    save_screenshot(page, "overview")

    figure.click()  # 1
    page.wait_for_selector("#result_list")
    row = page.locator("#result_list tbody tr", has_text="bob@example.com")
    assert "HTTP 500" in row.inner_text()  # the error column
    row.locator("th a").click()  # 2
    page.wait_for_selector("#lease-operations")
    assert "团队 B" in page.locator("#lease-error").inner_text()
    assert page.locator('[data-operation="force_transfer"]').count() == 0  # not from "failed"
    save_screenshot(page, "lease-page")
    page.locator('input[data-operation="retry"]').click()  # 3
    page.wait_for_selector(".messagelist")
    assert "已重试转移" in page.locator(".messagelist").inner_text()
    assert "操作员已重试转移" in page.locator("#lease-history").inner_text()
    troubled_world["failed"].refresh_from_db()
    assert troubled_world["failed"].status == LeaseStatus.TRANSFERRING


def test_a_clerk_without_the_permission_does_not_see_force_transfer(page, live_server, make_team, make_lease):
    lease = make_lease(make_team("团队 A"), LeaseStatus.ACTIVE, email="carol@example.com")
    clerk = get_user_model().objects.create_user("clerk", "c@example.com", "pw-clerk-123456", is_staff=True)
    clerk.user_permissions.add(*Permission.objects.filter(codename__in=["view_memberlease", "change_memberlease"]))
    admin_login(page, live_server, "clerk", "pw-clerk-123456")
    page.goto(f"{live_server.url}/admin/leases/memberlease/{lease.pk}/change/")
    page.wait_for_selector("#memberlease_form")
    assert page.locator('[data-operation="force_transfer"]').count() == 0
    assert page.locator('[data-operation="cancel"]').count() == 0
    page.goto(f"{live_server.url}/admin/leases/memberlease/")
    options = page.locator("select[name=action] option").all_inner_texts()
    assert not any("立即转移" in text or "取消所选" in text for text in options), options

    # An operator with the permission sees it, and is asked before anything changes.
    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    page.context.clear_cookies()
    admin_login(page, live_server, "ops", "pw-ops-123456")
    page.goto(f"{live_server.url}/admin/leases/memberlease/{lease.pk}/change/")
    page.locator('a[data-operation="force_transfer"]').click()
    page.wait_for_selector("#what-changes")
    assert "有效 → 转移中" in page.locator("#what-changes").inner_text()
