"""The public pages: redeem a code at /redeem/ and look at the lease's status page.

Redemptions invite through the real local fake provider (``make_team``). The per-address limiter
counts in Redis db 15 when REDIS_URL is set; every test posts from its own random address and
clears exactly that address's counter, so parallel runs of other suites are not disturbed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings as django_settings
from django.test import Client, TestCase
from django.urls import reverse
from django.utils import translation
from django.utils.html import escape
from django.utils.translation import gettext as _

from leases.models import LeaseAction, LeaseStatus, MemberLease
from leases.views import CUSTOMER_STATUS

pytestmark = pytest.mark.django_db

REDEEM_URL = "/redeem/"


def zh(msgid: str) -> str:
    with translation.override("zh-hans"):
        return _(msgid)


def _limiter_key(address: str) -> str:
    return "leasesite:attempts:redeem:" + hashlib.sha256(address.encode()).hexdigest()[:32]


def _forget(address: str) -> None:
    if django_settings.REDIS_URL:
        from leasesite.redis_client import get_redis

        get_redis().delete(_limiter_key(address))
    else:
        from leasesite import ratelimit

        ratelimit._local_windows.pop(_limiter_key(address).removeprefix("leasesite:attempts:"), None)


@pytest.fixture
def new_address() -> Iterator[Callable[[], str]]:
    """Random private client addresses (practically never shared with a parallel run); their limiter
    counters are cleared before use and after the test."""
    used: list[str] = []

    def factory() -> str:
        address = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
        _forget(address)
        used.append(address)
        return address

    yield factory
    for address in used:
        _forget(address)


@pytest.fixture
def address(new_address) -> str:
    return new_address()


@pytest.fixture(autouse=True)
def _tasks_run_here(eager_tasks) -> None:
    """The invite task the page sends after its commit runs in this process (see ``redeem``)."""


def redeem(client: Client, address: str, code: str, email: str):
    """POST the form, then run what it queued for after the commit (the invite task), as a
    worker would once the request has answered."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return client.post(REDEEM_URL, {"code": code, "email": email}, REMOTE_ADDR=address)


def test_redeem_form_renders_with_a_csrf_token(client):
    response = client.get(REDEEM_URL)
    assert response.status_code == 200
    body = response.content.decode()
    assert "csrfmiddlewaretoken" in body
    assert 'name="code"' in body and 'name="email"' in body


def test_redeem_invites_and_shows_the_status_page(
    client, address, provider, make_team, make_code, django_capture_on_commit_callbacks
):
    make_team("alpha")
    code = make_code()

    with django_capture_on_commit_callbacks() as after_commit:
        response = client.post(
            REDEEM_URL, {"code": code.code.lower(), "email": "Buyer@Example.com"}, REMOTE_ADDR=address
        )

    lease = MemberLease.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("leases:status", args=[lease.public_id])
    assert (lease.email, lease.team.name, lease.status) == ("buyer@example.com", "alpha", LeaseStatus.PENDING)
    # No provider call inside the request: the invite is a task sent after the commit.
    assert lease.invited_at is None and provider.state.calls(team="alpha") == 0
    for callback in after_commit:
        callback()
    lease.refresh_from_db()
    assert lease.invited_at is not None
    assert provider.state.team("alpha").invited_emails() == {"buyer@example.com"}
    code.refresh_from_db()
    assert code.redeemed_at is not None and code.lease_id == lease.pk

    page = client.get(response["Location"])
    body = page.content.decode()
    assert page.status_code == 200
    assert "buyer@example.com" in body and "alpha" in body
    with translation.override("zh-hans"):
        status_label = str(CUSTOMER_STATUS[lease.status])  # the customers' words, not the console's
        redeemed_label = str(LeaseAction.REDEEMED.label)
    assert f'<p class="status">{escape(status_label)}</p>' in body
    assert escape(redeemed_label) in body  # the history


def test_same_code_with_another_email_is_refused(client, address, provider, make_team, make_code):
    make_team("alpha")
    code = make_code()
    assert redeem(client, address, code.code, "first@example.com").status_code == 302

    response = redeem(client, address, code.code, "second@example.com")

    assert response.status_code == 400
    assert escape(zh("This code has already been used.")) in response.content.decode()
    assert MemberLease.objects.count() == 1
    assert MemberLease.objects.get().email == "first@example.com"
    assert provider.state.team("alpha").invite_posts == ["first@example.com"]


def test_double_submit_by_the_same_customer_returns_the_same_lease(client, address, provider, make_team, make_code):
    make_team("alpha")
    code = make_code()
    first = redeem(client, address, code.code, "buyer@example.com")

    second = redeem(client, address, code.code, "BUYER@example.com ")

    assert first.status_code == second.status_code == 302
    assert second["Location"] == first["Location"]
    assert MemberLease.objects.count() == 1
    assert provider.state.team("alpha").invite_posts == ["buyer@example.com"]  # invited once


def test_unknown_code_is_refused(client, address, make_team):
    make_team("alpha")
    response = redeem(client, address, "NOPE-NOPE-NOPE-NOPE", "buyer@example.com")
    assert response.status_code == 400
    assert escape(zh("This code does not exist. Check it and try again.")) in response.content.decode()
    assert not MemberLease.objects.exists()


def test_invalid_email_is_refused_and_the_code_stays_unused(client, address, provider, make_team, make_code):
    make_team("alpha")
    code = make_code()
    response = redeem(client, address, code.code, "not-an-email")
    assert response.status_code == 400
    assert not MemberLease.objects.exists()
    code.refresh_from_db()
    assert code.redeemed_at is None
    assert provider.state.team("alpha").invite_posts == []


def test_no_free_seat_puts_the_customer_on_the_waiting_list(
    client, address, provider, make_team, make_lease, make_code
):
    full = make_team("tiny", capacity=1)
    make_lease(full, LeaseStatus.PENDING)
    code = make_code()

    response = redeem(client, address, code.code, "buyer@example.com")

    lease = MemberLease.objects.get(email="buyer@example.com")
    assert response.status_code == 302
    assert response["Location"] == reverse("leases:status", args=[lease.public_id])
    assert lease.status == LeaseStatus.WAITING
    page = client.get(response["Location"]).content.decode()
    assert "排队" in page and "第 1 位" in page
    assert provider.state.team("tiny").invite_posts == []


def test_csrf_is_enforced(address, make_team, make_code):
    make_team("alpha")
    code = make_code()
    strict = Client(enforce_csrf_checks=True)

    refused = strict.post(REDEEM_URL, {"code": code.code, "email": "buyer@example.com"}, REMOTE_ADDR=address)
    assert refused.status_code == 403
    code.refresh_from_db()
    assert code.redeemed_at is None

    form = strict.get(REDEEM_URL).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    accepted = strict.post(
        REDEEM_URL,
        {"code": code.code, "email": "buyer@example.com", "csrfmiddlewaretoken": token},
        REMOTE_ADDR=address,
    )
    assert accepted.status_code == 302
    assert MemberLease.objects.count() == 1


def test_rate_limit_per_address(client, new_address, settings, make_team, make_code):
    settings.LEASE_REDEEM_RATE_LIMIT = 3
    make_team("alpha")
    code = make_code()
    busy, other = new_address(), new_address()

    statuses = [redeem(client, busy, "NOPE-NOPE-NOPE-NOPE", "x@example.com").status_code for _ in range(3)]
    assert statuses == [400, 400, 400]

    limited = redeem(client, busy, code.code, "buyer@example.com")
    assert limited.status_code == 429
    assert escape(zh("Too many attempts from your address. Wait a few minutes and try again.")) in (
        limited.content.decode()
    )
    code.refresh_from_db()
    assert code.redeemed_at is None and not MemberLease.objects.exists()

    assert redeem(client, other, code.code, "buyer@example.com").status_code == 302
    if settings.REDIS_URL:
        from leasesite.redis_client import get_redis

        assert int(get_redis().get(_limiter_key(busy))) == 4


def test_status_page_of_an_unknown_lease_is_404(client):
    assert client.get(reverse("leases:status", args=[uuid.uuid4()])).status_code == 404
    assert client.get("/redeem/lease/not-a-uuid/").status_code == 404


def test_status_page_shows_public_events_only(client, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE)
    lease.events.create(action=LeaseAction.JOINED, from_status="pending", to_status="active")
    lease.events.create(action=LeaseAction.RESET, from_status="failed", to_status="active", detail={"x": 1})
    lease.events.create(
        action=LeaseAction.TRANSFER_STARTED,
        from_status="active",
        to_status="transferring",
        detail={"from_team": "alpha", "to_team": "beta-next"},
    )

    response = client.get(reverse("leases:status", args=[lease.public_id]))

    assert response.status_code == 200
    assert [event.action for event in response.context["events"]] == [
        LeaseAction.JOINED,
        LeaseAction.TRANSFER_STARTED,
    ]
    assert "beta-next" in response.content.decode()  # an event without "team" shows its "to_team"


def test_redeem_rejects_other_methods(client):
    assert client.put(REDEEM_URL).status_code == 405
