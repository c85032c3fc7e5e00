"""The lease console: a failed lease fixed from its page in three clicks, operations derived from the
state machine, dangerous ones confirmed and permission-gated, readable history, protected codes."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import transaction
from django.db.models import ProtectedError
from django.urls import reverse
from django.utils import timezone

from leases.history import event_line
from leases.models import ALLOWED_TRANSITIONS, LeaseAction, LeaseEvent, LeaseStatus, RedemptionCode, TeamHealth
from leases.operations import OPERATIONS
from tests.leases.test_admin import messages_of, zh

pytestmark = pytest.mark.django_db


def change_url(lease) -> str:
    return reverse("admin:leases_memberlease_change", args=[lease.pk])


def operate_url(lease, name: str) -> str:
    return reverse("admin:leases_memberlease_operate", args=[lease.pk, name])


@pytest.fixture
def clerk(client):
    """Staff who may view and change leases (retry, reset) but not force transfers or cancel."""
    user = get_user_model().objects.create_user("clerk", "clerk@example.com", "pw-clerk-123456", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_memberlease", "change_memberlease", "view_team"])
    )
    client.force_login(user)
    return client


def test_every_operation_is_a_transition_the_state_machine_allows():
    for operation in OPERATIONS:
        for status in operation.from_statuses:
            assert operation.to_status in ALLOWED_TRANSITIONS[status], (operation.name, status)


def test_a_failed_lease_is_fixed_in_three_clicks_from_the_overview(admin_client, admin_user, make_team, make_lease):
    alpha, beta = make_team("团队 A"), make_team("团队 B")
    lease = make_lease(alpha, LeaseStatus.FAILED, last_error="邀请加入团队 团队 B 失败：POST invites: HTTP 500")
    LeaseEvent.objects.create(
        lease=lease,
        action=LeaseAction.TRANSFER_FAILED,
        from_status=LeaseStatus.TRANSFERRING,
        to_status=LeaseStatus.FAILED,
        detail={"error": "POST invites: HTTP 500", "attempts": 5, "failed_team": beta.name, "member_of": ["团队 A"]},
    )
    home = admin_client.get("/admin/").content.decode()
    # click 1: the overview's figure → the failed list (with the error column)
    failed_list_url = re.search(r'<a href="([^"]+status__exact=failed)"', home).group(1).replace("&amp;", "&")
    listing = admin_client.get(failed_list_url).content.decode()
    assert "POST invites: HTTP 500" in listing
    # click 2: the lease → its page names the teams, the error, and the allowed operations
    page = admin_client.get(change_url(lease))
    body = page.content.decode()
    assert "团队 A" in body and "团队 B" in body and "HTTP 500" in body
    assert [op.name for op, _url in page.context["operations"]] == ["retry", "reset", "cancel"]
    assert "出错的团队: 团队 B" in body  # the transfer_failed event's labelled details
    # click 3: retry
    response = admin_client.post(operate_url(lease, "retry"))
    assert response.status_code == 302 and response["Location"] == change_url(lease)
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.TRANSFERRING
    event = lease.events.get(action=LeaseAction.RETRY)
    assert event.actor == admin_user
    after = admin_client.get(change_url(lease)).content.decode()
    assert zh("Transfer retried by an operator.") in after and admin_user.username in after


def test_the_operations_offered_follow_the_status(admin_client, make_team, make_lease):
    team = make_team("alpha")
    offered = {}
    for status in (LeaseStatus.PENDING, LeaseStatus.ACTIVE, LeaseStatus.FAILED, LeaseStatus.CANCELLED):
        lease = make_lease(team, status)
        context = admin_client.get(change_url(lease)).context
        offered[status] = [op.name for op, _url in context["operations"]]
    assert offered == {
        LeaseStatus.PENDING: ["cancel"],
        LeaseStatus.ACTIVE: ["force_transfer", "cancel"],
        LeaseStatus.FAILED: ["retry", "reset", "cancel"],
        LeaseStatus.CANCELLED: [],
    }


def test_an_operation_in_the_wrong_state_is_refused_and_changes_nothing(admin_client, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE)
    events = lease.events.count()
    response = admin_client.post(operate_url(lease, "reset"))
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE and lease.events.count() == events
    (level_text,) = messages_of(response)
    assert "重置为有效" in level_text[1] and str(lease.pk) in level_text[1]


def test_force_transfer_and_cancel_ask_first_and_show_what_changes(admin_client, make_team, make_lease):
    make_team("beta")
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE)
    confirm = admin_client.get(operate_url(lease, "force_transfer"))
    body = confirm.content.decode()
    assert confirm.status_code == 200
    assert "有效 → 转移中" in body and 'id="confirm"' in body
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE  # nothing yet
    admin_client.post(operate_url(lease, "force_transfer"))
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.TRANSFERRING

    other = make_lease(make_team("gamma"), LeaseStatus.PENDING)
    assert "已取消" in admin_client.get(operate_url(other, "cancel")).content.decode()
    other.refresh_from_db()
    assert other.status == LeaseStatus.PENDING


def test_a_clerk_without_the_permissions_sees_no_force_transfer_or_cancel(clerk, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE)
    page = clerk.get(change_url(lease))
    assert page.status_code == 200
    assert page.context["operations"] == []
    body = page.content.decode()
    assert 'data-operation="force_transfer"' not in body and 'data-operation="cancel"' not in body
    actions = [
        name
        for name, _label in clerk.get(reverse("admin:leases_memberlease_changelist"))
        .context["action_form"]
        .fields["action"]
        .choices
    ]
    assert "retry_transfer" in actions
    assert "force_transfer" not in actions and "cancel_leases" not in actions
    assert clerk.post(operate_url(lease, "force_transfer")).status_code == 403
    assert clerk.post(operate_url(lease, "cancel")).status_code == 403
    refused = clerk.post(
        reverse("admin:leases_memberlease_changelist"),
        {"action": "force_transfer", "_selected_action": [lease.pk], "confirmed": "yes"},
    )
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE and refused.status_code in (200, 302)


def test_a_failed_lease_gets_a_note(admin_client, admin_user, make_team, make_lease):
    lease = make_lease(make_team("alpha"), LeaseStatus.FAILED)
    admin_client.post(reverse("admin:leases_memberlease_note", args=[lease.pk]), {"text": "客户说已经在团队里了"})
    note = lease.events.filter(action=LeaseAction.NOTE, actor=admin_user).get()
    assert note.detail["note"] == "客户说已经在团队里了"
    assert "备注：客户说已经在团队里了" in admin_client.get(change_url(lease)).content.decode()
    empty = admin_client.post(reverse("admin:leases_memberlease_note", args=[lease.pk]), {"text": "  "})
    assert messages_of(empty) and lease.events.filter(action=LeaseAction.NOTE, actor=admin_user).count() == 1


def test_retry_every_lease_that_failed_on_a_team(admin_client, make_team, make_lease):
    alpha, beta = make_team("alpha"), make_team("beta")
    seated_there = make_lease(beta, LeaseStatus.FAILED)
    gave_up_on_beta = make_lease(alpha, LeaseStatus.FAILED)
    LeaseEvent.objects.create(
        lease=gave_up_on_beta,
        action=LeaseAction.TRANSFER_FAILED,
        from_status=LeaseStatus.TRANSFERRING,
        to_status=LeaseStatus.FAILED,
        detail={"failed_team": "beta"},
    )
    unrelated = make_lease(alpha, LeaseStatus.FAILED)
    page = admin_client.get(reverse("admin:leases_team_change", args=[beta.pk])).content.decode()
    assert "重试此团队上失败的全部租约" in page and "此团队上有 2 个租约失败" in page
    admin_client.post(reverse("admin:leases_team_retry_failed", args=[beta.pk]))
    statuses = {
        lease.pk: lease.status
        for lease in (seated_there, gave_up_on_beta, unrelated)
        if lease.refresh_from_db() is None
    }
    assert statuses == {
        seated_there.pk: LeaseStatus.TRANSFERRING,
        gave_up_on_beta.pk: LeaseStatus.TRANSFERRING,
        unrelated.pk: LeaseStatus.FAILED,
    }


def test_marking_a_team_dead_needs_its_permission_and_a_confirmation(admin_client, clerk, make_team, make_lease):
    team = make_team("alpha")
    make_lease(team, LeaseStatus.ACTIVE)
    url = reverse("admin:leases_team_changelist")
    clerk_actions = [name for name, _label in clerk.get(url).context["action_form"].fields["action"].choices]
    assert "mark_dead" not in clerk_actions and "mark_healthy" not in clerk_actions

    confirm = admin_client.post(url, {"action": "mark_dead", "_selected_action": [team.pk]})
    assert confirm.status_code == 200
    assert confirm.context["changes"] == ["alpha：健康 → 失效（凭据被吊销或工作区已停用）（1 个未结束的租约）"]
    team.refresh_from_db()
    assert team.health == TeamHealth.HEALTHY
    admin_client.post(url, {"action": "mark_dead", "_selected_action": [team.pk], "confirmed": "yes"})
    team.refresh_from_db()
    assert team.health == TeamHealth.DEAD


def test_redeemed_codes_cannot_be_deleted(admin_client, make_team, make_lease, make_code):
    lease = make_lease(make_team("alpha"))
    used, fresh = make_code(), make_code()
    RedemptionCode.objects.filter(pk=used.pk).update(redeemed_at=timezone.now(), lease=lease)
    url = reverse("admin:leases_redemptioncode_changelist")
    response = admin_client.post(url, {"action": "delete_selected", "_selected_action": [used.pk, fresh.pk]})
    assert response.status_code == 302
    assert RedemptionCode.objects.count() == 2
    assert used.code in messages_of(response)[0][1]
    assert admin_client.get(reverse("admin:leases_redemptioncode_delete", args=[used.pk])).status_code == 403
    with pytest.raises(ProtectedError), transaction.atomic():  # a savepoint: the test's transaction lives on
        RedemptionCode.objects.filter(pk=used.pk).delete()
    confirm = admin_client.post(url, {"action": "delete_selected", "_selected_action": [fresh.pk]})
    assert confirm.status_code == 200  # Django's own confirmation page for an unused code
    admin_client.post(url, {"action": "delete_selected", "_selected_action": [fresh.pk], "post": "yes"})
    assert list(RedemptionCode.objects.values_list("pk", flat=True)) == [used.pk]


def test_history_reads_as_sentences_with_labelled_details(make_team, make_lease):
    lease = make_lease(make_team("团队 A"), LeaseStatus.ACTIVE)
    moved = LeaseEvent.objects.create(
        lease=lease,
        action=LeaseAction.TRANSFERRED,
        from_status=LeaseStatus.TRANSFERRING,
        to_status=LeaseStatus.PENDING,
        detail={"from_team": "团队 A", "to_team": "团队 B"},
    )
    line = event_line(moved)
    assert line.sentence == "已从团队 团队 A 转移到团队 团队 B。"
    assert line.status_change == "转移中 → 待加入（已邀请）"
    assert line.actor == "系统" and line.details == []
    retry = LeaseEvent.objects.create(
        lease=lease,
        action=LeaseAction.TRANSFER_RETRY,
        detail={"error": "HTTP 503", "attempt": 2, "next_attempt_at": "2026-12-03T02:00:00+00:00", "team": "团队 B"},
    )
    line = event_line(retry)
    assert line.sentence == "第 2 次转移失败，将于 2026-12-03 10:00 重试：HTTP 503"  # Asia/Shanghai
    assert line.details == [("团队", "团队 B")]
    assert str(lease) == f"{lease.email} @ 团队 A (有效)"
