"""A customer on a phone redeems a code and lands on the status page of their seat."""

from __future__ import annotations

import pytest

from leases.models import LeaseStatus, MemberLease
from tests.browser.conftest import save_screenshot

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_customer_redeems_a_code_on_a_phone(phone_page, live_server, provider, make_team, make_code, eager_tasks):
    make_team("团队 A", capacity=5)
    code = make_code()
    page = phone_page
    page.goto(f"{live_server.url}/")  # the root sends customers to the redeem page
    page.wait_for_selector("input[name=code]")
    assert page.url.endswith("/redeem/")
    # Nothing sticks out of a 375 px screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.fill("input[name=code]", code.code.lower())
    page.fill("input[name=email]", "Buyer@Example.com")
    save_screenshot(page, "redeem")
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url("**/redeem/lease/**")
    lease = MemberLease.objects.get()
    assert (lease.email, lease.status) == ("buyer@example.com", LeaseStatus.PENDING)
    assert "buyer@example.com" in page.content()
    # The invite went out from the task queued after the commit (run in-process here).
    assert provider.state.team("团队 A").invited_emails() == {"buyer@example.com"}
    save_screenshot(page, "redeem-status")
