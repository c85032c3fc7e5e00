"""A customer redeems while every seat is taken, sees their place in the queue, and is invited as
soon as a seat frees."""

from __future__ import annotations

import pytest
from django.test import TestCase

from leases.models import LeaseStatus, MemberLease
from leases.services.cancellation import lease_cancel
from tests.browser.conftest import save_screenshot

pytestmark = pytest.mark.django_db(transaction=True)


def test_redeem_when_full_then_invited_when_a_seat_frees(
    phone_page, live_server, provider, make_team, make_lease, make_code, eager_tasks
):
    team = make_team("团队 A", capacity=1)
    seated = make_lease(team, LeaseStatus.ACTIVE, email="seated@example.com")
    code = make_code()
    page = phone_page
    page.goto(f"{live_server.url}/redeem/")
    page.fill("input[name=code]", code.code)
    page.fill("input[name=email]", "queued@example.com")
    page.click("button[type=submit]")
    page.wait_for_url("**/redeem/lease/**")
    assert "排队等待席位" in page.locator("p.status").inner_text()
    assert "第 1 位" in page.locator("p.queue").inner_text()
    save_screenshot(page, "redeem-waiting")

    with TestCase.captureOnCommitCallbacks(execute=True):  # the seat-freeing task, then the invite task
        lease_cancel(lease_id=seated.pk, reason="left")
    page.reload()
    assert "等待接受邀请" in page.locator("p.status").inner_text()
    assert "团队 A" in page.content()
    lease = MemberLease.objects.get(email="queued@example.com")
    assert (lease.status, lease.team_id) == (LeaseStatus.PENDING, team.pk) and lease.invited_at is not None
    assert provider.state.team("团队 A").invited_emails() == {"queued@example.com"}

    # Found again by code and email.
    page.goto(f"{live_server.url}/redeem/status/")
    page.fill("input[name=code]", code.code.lower())
    page.fill("input[name=email]", "Queued@Example.com")
    page.click("button[type=submit]")
    page.wait_for_url(f"**/redeem/lease/{lease.public_id}/")
