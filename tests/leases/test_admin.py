"""The operator console for seat leases: pages render, actions act lease by lease and refuse the
leases in the wrong state (naming them), secrets never reach the page, codes are generated and
exported. The console speaks zh-hans: expected messages are built with gettext of the same msgid."""

from __future__ import annotations

import csv
import io

import pytest
from django.contrib.messages import constants as message_levels
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.functional import Promise
from django.utils.translation import gettext as _

from leases.models import LeaseAction, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.providers import TransientProviderError
from tests.leases.conftest import TEAM_TOKEN

pytestmark = pytest.mark.django_db

LEASES_URL = "admin:leases_memberlease_changelist"
TEAMS_URL = "admin:leases_team_changelist"
CODES_URL = "admin:leases_redemptioncode_changelist"


def act(client, url_name: str, action: str, ids: list[int], *, confirmed: bool = False):
    data = {"action": action, "_selected_action": ids}
    if confirmed:  # the second POST, from the confirmation page of a dangerous action
        data["confirmed"] = "yes"
    return client.post(reverse(url_name), data)


def messages_of(response) -> list[tuple[int, str]]:
    return [(m.level, str(m)) for m in get_messages(response.wsgi_request)]


def zh(msgid: str, **params: object) -> str:
    """The console's rendering of ``msgid`` (lazy labels in ``params`` are translated here too)."""
    with translation.override("zh-hans"):
        text = _(msgid)
        return text % {k: str(v) if isinstance(v, Promise) else v for k, v in params.items()} if params else text


def label(status: str) -> str:
    with translation.override("zh-hans"):
        return str(LeaseStatus(status).label)


def snapshot(lease: MemberLease) -> tuple:
    lease.refresh_from_db()
    return (
        lease.status,
        lease.team_id,
        lease.joined_at,
        lease.expires_at,
        lease.attempts,
        lease.last_error,
        lease.transfer_team_id,
        lease.events.count(),
    )


# -- pages ------------------------------------------------------------------------------------------
def test_lease_changelist_and_change_page_show_the_readable_history(admin_client, admin_user, make_team, make_lease):
    team = make_team("alpha")
    lease = make_lease(team, LeaseStatus.FAILED, last_error="provider said no")
    lease.events.create(action=LeaseAction.TRANSFER_FAILED, from_status="transferring", to_status="failed")

    listing = admin_client.get(reverse(LEASES_URL))
    assert listing.status_code == 200
    assert lease.email in listing.content.decode()
    assert list(listing.context["cl"].result_list) == [lease]

    page = admin_client.get(reverse("admin:leases_memberlease_change", args=[lease.pk]))
    body = page.content.decode()
    assert page.status_code == 200
    assert len(page.context["history"]) == lease.events.count() == 2
    assert (
        zh("Transfer failed after %(attempts)s attempt(s) and needs a human: %(error)s", attempts="-", error="-")
        in body
    )
    assert str(lease.public_id) in body  # the status page link
    assert "provider said no" in body


def test_lease_add_page_is_refused(admin_client):
    assert admin_client.get(reverse("admin:leases_memberlease_add")).status_code == 403


def test_team_pages_never_show_the_plaintext_token(admin_client, make_team):
    team = make_team("alpha")
    listing = admin_client.get(reverse(TEAMS_URL))
    assert listing.status_code == 200
    assert "alpha" in listing.content.decode()
    assert TEAM_TOKEN not in listing.content.decode()

    page = admin_client.get(reverse("admin:leases_team_change", args=[team.pk]))
    body = page.content.decode()
    assert page.status_code == 200
    assert TEAM_TOKEN not in body
    assert team.masked_api_token and team.masked_api_token in body
    assert 'type="password"' in body and 'name="api_token"' in body


def test_team_saved_with_an_empty_token_field_keeps_its_token(admin_client, make_team):
    team = make_team("alpha", capacity=5)
    response = admin_client.post(
        reverse("admin:leases_team_change", args=[team.pk]),
        {
            "name": "alpha",
            "provider": "http",
            "api_base": team.api_base,
            "api_token": "",
            "capacity": "7",
            "is_active": "on",
            "expires_at_0": "",
            "expires_at_1": "",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    team.refresh_from_db()
    assert team.capacity == 7
    assert team.api_token == TEAM_TOKEN


# -- lease actions ------------------------------------------------------------------------------------
def test_reset_to_active_refuses_a_pending_lease_and_leaves_it_alone(admin_client, admin_user, make_team, make_lease):
    team = make_team("alpha")
    failed = make_lease(team, LeaseStatus.FAILED, last_error="boom", attempts=5)
    pending = make_lease(team, LeaseStatus.PENDING)
    pending_before = snapshot(pending)

    response = act(admin_client, LEASES_URL, "reset_to_active", [failed.pk, pending.pk])

    assert response.status_code == 302
    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.last_error) == (LeaseStatus.ACTIVE, 0, "")
    event = failed.events.get(action=LeaseAction.RESET)
    assert (event.from_status, event.to_status, event.actor) == (LeaseStatus.FAILED, LeaseStatus.ACTIVE, admin_user)
    assert event.detail["previous_error"] == "boom"
    assert snapshot(pending) == pending_before

    msgs = messages_of(response)
    refused = zh(
        "Lease %(id)s is %(status)s; only failed leases can be reset to active.",
        id=pending.pk,
        status=label(LeaseStatus.PENDING),
    )
    assert (message_levels.ERROR, refused) in msgs
    assert (message_levels.SUCCESS, zh("%(count)d lease(s) reset to active.", count=1)) in msgs
    assert not any(str(failed.pk) in text and level == message_levels.ERROR for level, text in msgs)


def test_retry_transfer_queues_one_run_after_commit(
    admin_client, admin_user, make_team, make_lease, django_capture_on_commit_callbacks, monkeypatch
):
    team = make_team("alpha")
    lease = make_lease(team, LeaseStatus.FAILED, attempts=5, last_error="gave up")

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = act(admin_client, LEASES_URL, "retry_transfer", [lease.pk])

    assert response.status_code == 302
    lease.refresh_from_db()
    assert (lease.status, lease.attempts, lease.last_error) == (LeaseStatus.TRANSFERRING, 0, "")
    assert lease.next_attempt_at is not None
    event = lease.events.get(action=LeaseAction.RETRY)
    assert (event.from_status, event.to_status, event.actor) == (
        LeaseStatus.FAILED,
        LeaseStatus.TRANSFERRING,
        admin_user,
    )
    assert len(callbacks) == 1

    # The callback queues the transfer run for this customer only.
    from leases.tasks import run_transfers

    queued = []
    monkeypatch.setattr(run_transfers, "delay", lambda **kwargs: queued.append(kwargs))
    callbacks[0]()
    assert queued == [{"email": lease.email}]


def test_retry_transfer_refuses_an_active_lease(
    admin_client, make_team, make_lease, django_capture_on_commit_callbacks
):
    team = make_team("alpha")
    active = make_lease(team, LeaseStatus.ACTIVE)
    before = snapshot(active)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = act(admin_client, LEASES_URL, "retry_transfer", [active.pk])
    assert snapshot(active) == before
    assert callbacks == []
    expected = zh(
        "Lease %(id)s is %(status)s; only failed leases can be retried.", id=active.pk, status=label("active")
    )
    assert (message_levels.ERROR, expected) in messages_of(response)


def test_force_transfer_moves_an_active_lease_and_refuses_a_pending_one(
    admin_client, admin_user, make_team, make_lease, django_capture_on_commit_callbacks
):
    alpha, beta = make_team("alpha"), make_team("beta")
    active = make_lease(alpha, LeaseStatus.ACTIVE)
    pending = make_lease(alpha, LeaseStatus.PENDING)
    pending_before = snapshot(pending)

    confirm = act(admin_client, LEASES_URL, "force_transfer", [active.pk, pending.pk])
    assert confirm.status_code == 200  # the confirmation page: what will change, nothing changed yet
    assert confirm.context["changes"] == [f"{active.email} @ alpha: {label('active')} → {label('transferring')}"]
    assert len(confirm.context["refused"]) == 1 and pending.email in str(confirm.context["refused"][0])
    active.refresh_from_db()
    assert active.status == LeaseStatus.ACTIVE

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = act(admin_client, LEASES_URL, "force_transfer", [active.pk, pending.pk], confirmed=True)

    assert response.status_code == 302
    active.refresh_from_db()
    assert active.status == LeaseStatus.TRANSFERRING
    assert (active.team_id, active.transfer_team_id) == (alpha.pk, beta.pk)
    event = active.events.get(action=LeaseAction.TRANSFER_STARTED)
    assert event.actor == admin_user
    assert event.detail["forced"] is True and event.detail["to_team"] == "beta"
    assert snapshot(pending) == pending_before
    assert len(callbacks) == 1

    msgs = messages_of(response)
    refused = zh(
        "Lease %(id)s is %(status)s; only active leases can be transferred.",
        id=pending.pk,
        status=label(LeaseStatus.PENDING),
    )
    assert (message_levels.ERROR, refused) in msgs
    assert (message_levels.SUCCESS, zh("%(count)d lease(s) are being transferred.", count=1)) in msgs


def test_cancel_frees_the_seat_at_the_provider_and_a_second_cancel_is_refused(
    admin_client, admin_user, provider, make_team, make_lease, eager_tasks, django_capture_on_commit_callbacks
):
    team = make_team("alpha")
    fake = provider.state.team("alpha")
    seated = make_lease(team, LeaseStatus.ACTIVE, email="seated@example.com")
    member_id = fake.add_member(seated.email)
    MemberLease.objects.filter(pk=seated.pk).update(provider_member_id=member_id)
    invited = make_lease(team, LeaseStatus.PENDING, email="invited@example.com")
    fake.invite(invited.email)
    assert fake.member_emails() == {"seated@example.com"} and fake.invited_emails() == {"invited@example.com"}

    assert act(admin_client, LEASES_URL, "cancel_leases", [seated.pk, invited.pk]).status_code == 200  # confirm?
    calls_before = provider.state.calls(team="alpha")
    with django_capture_on_commit_callbacks() as after_commit:
        response = act(admin_client, LEASES_URL, "cancel_leases", [seated.pk, invited.pk], confirmed=True)
    assert provider.state.calls(team="alpha") == calls_before  # no provider call inside the request
    assert len(after_commit) == 2
    for callback in after_commit:  # the seat-freeing tasks, as a worker runs them
        callback()

    assert response.status_code == 302
    for lease in (seated, invited):
        lease.refresh_from_db()
        assert lease.status == LeaseStatus.CANCELLED
        cancelled = lease.events.get(action=LeaseAction.CANCELLED)
        assert (cancelled.from_status, cancelled.actor) == (
            LeaseStatus.ACTIVE if lease is seated else LeaseStatus.PENDING,
            admin_user,
        )
        assert lease.events.filter(action=LeaseAction.LEFT_OLD_TEAM, actor=admin_user).count() == 1
    assert fake.member_emails() == set()
    assert fake.invited_emails() == set()
    assert (
        message_levels.SUCCESS,
        zh("%(count)d lease(s) cancelled or marked for cancellation; workers free their seats now.", count=2),
    ) in messages_of(response)

    events_before = seated.events.count()
    admin_client.get(reverse(LEASES_URL))  # shows (and so consumes) the messages of the first POST
    again = act(admin_client, LEASES_URL, "cancel_leases", [seated.pk], confirmed=True)
    refused = zh("Lease %(id)s is already %(status)s.", id=seated.pk, status=label(LeaseStatus.CANCELLED))
    assert messages_of(again) == [(message_levels.ERROR, refused)]
    seated.refresh_from_db()
    assert seated.status == LeaseStatus.CANCELLED and seated.events.count() == events_before


def test_cancel_when_the_provider_fails_still_cancels_and_notes_it(
    admin_client, provider, make_team, make_lease, eager_tasks, django_capture_on_commit_callbacks
):
    team = make_team("alpha")
    fake = provider.state.team("alpha")
    lease = make_lease(team, LeaseStatus.ACTIVE)
    member_id = fake.add_member(lease.email)
    MemberLease.objects.filter(pk=lease.pk).update(provider_member_id=member_id)
    fake.fail_next.append(TransientProviderError("boom", status=503))

    with django_capture_on_commit_callbacks(execute=True):
        act(admin_client, LEASES_URL, "cancel_leases", [lease.pk], confirmed=True)

    lease.refresh_from_db()
    assert lease.status == LeaseStatus.CANCELLED
    note = lease.events.get(action=LeaseAction.SEAT_NOT_FREED, detail__team="alpha")
    assert "503" in note.detail["error"]
    assert not lease.events.filter(action=LeaseAction.LEFT_OLD_TEAM).exists()
    assert lease.email in fake.member_emails()  # still seated: an operator must look


def test_team_sync_now_queues_a_sync_per_team_that_activates_joined_leases_and_records_failures(
    admin_client, provider, make_team, make_lease, eager_tasks, django_capture_on_commit_callbacks
):
    alpha, beta = make_team("alpha"), make_team("beta")
    lease = make_lease(alpha, LeaseStatus.PENDING)
    member_id = provider.state.team("alpha").accept(lease.email)
    provider.state.team("beta").fail_next.append(TransientProviderError("boom", status=503))
    calls_before = provider.state.calls()

    with django_capture_on_commit_callbacks() as after_commit:
        response = act(admin_client, TEAMS_URL, "sync_now", [alpha.pk, beta.pk])
    assert provider.state.calls() == calls_before  # the request only queued the syncs
    assert response.status_code == 302
    queued = zh("Join sync of %(count)d team queued; its result appears on the team's page within a minute.", count=2)
    assert messages_of(response) == [(message_levels.SUCCESS, queued)]
    assert len(after_commit) == 2
    for callback in after_commit:
        callback()

    lease.refresh_from_db()
    assert (lease.status, lease.provider_member_id) == (LeaseStatus.ACTIVE, member_id)
    beta.refresh_from_db()
    assert beta.last_sync_error and beta.last_synced_at is None


def test_lease_sync_now_syncs_the_selected_leases_teams(
    admin_client, provider, make_team, make_lease, eager_tasks, django_capture_on_commit_callbacks
):
    alpha = make_team("alpha")
    lease = make_lease(alpha, LeaseStatus.PENDING)
    provider.state.team("alpha").accept(lease.email)

    with django_capture_on_commit_callbacks(execute=True):
        response = act(admin_client, LEASES_URL, "sync_now", [lease.pk])

    assert response.status_code == 302
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE
    assert Team.objects.get(pk=alpha.pk).last_synced_at is not None


# -- redemption codes -----------------------------------------------------------------------------------
def test_generate_codes_page_creates_a_batch_and_lists_it(admin_client):
    url = reverse("admin:leases_redemptioncode_generate")
    page = admin_client.get(url)
    assert page.status_code == 200
    assert 'name="count"' in page.content.decode()

    response = admin_client.post(url, {"count": "3", "term_months": "1", "total_months": "6", "batch": "spring"})

    assert response.status_code == 302
    assert response["Location"] == reverse(CODES_URL) + "?batch=spring"
    codes = RedemptionCode.objects.filter(batch="spring")
    assert codes.count() == RedemptionCode.objects.count() == 3
    assert {(c.term_months, c.total_months, c.redeemed_at) for c in codes} == {(1, 6, None)}
    listing = admin_client.get(response["Location"])
    assert listing.status_code == 200
    assert set(listing.context["cl"].result_list) == set(codes)


def test_generate_codes_refuses_an_entitlement_shorter_than_the_term(admin_client):
    response = admin_client.post(
        reverse("admin:leases_redemptioncode_generate"), {"count": "3", "term_months": "3", "total_months": "1"}
    )
    assert response.status_code == 200
    expected = zh("The entitlement cannot be shorter than one term.")
    assert response.context["form"].errors["total_months"] == [expected]
    assert expected in response.content.decode()
    assert not RedemptionCode.objects.exists()


def test_export_csv_lists_the_selected_codes_with_the_redeeming_email(admin_client, make_team, make_lease, make_code):
    team = make_team("alpha")
    plain = make_code(code="AAAA-BBBB-CCCC-DDDD", term_months=1, total_months=3)
    used = make_code(code="EEEE-FFFF-GGGG-HHHH")
    lease = make_lease(team, LeaseStatus.PENDING, email="buyer@example.com")
    RedemptionCode.objects.filter(pk=used.pk).update(redeemed_at=timezone.now(), lease=lease)
    make_code(code="ZZZZ-ZZZZ-ZZZZ-ZZZZ")  # not selected

    response = act(admin_client, CODES_URL, "export_csv", [plain.pk, used.pk])

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith("attachment;")
    rows = list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert rows[0] == ["code", "term_months", "total_months", "batch", "created_at", "redeemed_at", "email", "pool"]
    by_code = {row[0]: row for row in rows[1:]}
    assert set(by_code) == {plain.code, used.code}
    assert by_code[plain.code][1:3] == ["1", "3"]
    assert by_code[plain.code][5:] == ["", "", "default"]
    assert by_code[used.code][5] != ""
    assert by_code[used.code][6] == "buyer@example.com"


def test_codes_cannot_be_added_one_by_one(admin_client):
    assert admin_client.get(reverse("admin:leases_redemptioncode_add")).status_code == 403


def test_leases_cannot_be_deleted_only_cancelled(admin_client, make_team, make_lease):
    lease = make_lease(make_team("alpha"))
    page = admin_client.get("/admin/leases/memberlease/").content.decode()
    assert 'value="delete_selected"' not in page
    assert admin_client.get(f"/admin/leases/memberlease/{lease.pk}/delete/").status_code == 403
    assert MemberLease.objects.filter(pk=lease.pk).exists()
