from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from tests.conftest import new_token_value
from tokens.models import BaomingToken, DeletionReason, RefreshRun, RunKind, TokenDeletion

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    client.user = user
    return client


def test_list_shows_masked_tokens_only(admin_client, make_token):
    token = make_token(card_name="张三")
    response = admin_client.get(reverse("admin:tokens_baomingtoken_changelist"))
    body = response.content.decode()
    assert response.status_code == 200
    assert "张三" in body and token.masked_token in body
    assert token.token not in body


def test_change_page_never_renders_the_token(admin_client, make_token):
    token = make_token()
    body = admin_client.get(reverse("admin:tokens_baomingtoken_change", args=[token.pk])).content.decode()
    assert token.masked_token in body and token.token not in body


def test_search_by_name(admin_client, make_token):
    target, _other = make_token(card_name="甲方"), make_token(card_name="乙方")
    url = reverse("admin:tokens_baomingtoken_changelist")
    by_name = admin_client.get(url, {"q": "甲方"}).context["cl"].result_list
    assert list(by_name) == [target]


def test_filters_by_failures_and_age(admin_client, make_token):
    failing = make_token(consecutive_failures=4)
    make_token()
    url = reverse("admin:tokens_baomingtoken_changelist")
    assert list(admin_client.get(url, {"failures": "3"}).context["cl"].result_list) == [failing]
    assert len(admin_client.get(url, {"age": "never"}).context["cl"].result_list) == 2


def test_add_token_through_the_admin(admin_client):
    value = new_token_value()
    response = admin_client.post(
        reverse("admin:tokens_baomingtoken_add"), {"card_name": "新名片", "user_name": "u", "token": value}
    )
    assert response.status_code == 302
    assert BaomingToken.objects.get().token == value
    duplicate = admin_client.post(
        reverse("admin:tokens_baomingtoken_add"), {"card_name": "x", "user_name": "", "token": value}
    )
    assert duplicate.status_code == 200 and BaomingToken.objects.count() == 1
    assert value not in duplicate.content.decode()


def test_refresh_now_queues_a_task_after_commit(admin_client, make_token, django_capture_on_commit_callbacks):
    tokens = [make_token(), make_token()]
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = admin_client.post(
            reverse("admin:tokens_baomingtoken_changelist"),
            {"action": "refresh_now", "_selected_action": [t.pk for t in tokens]},
        )
    assert response.status_code == 302
    assert len(callbacks) == 1


def test_delete_action_keeps_an_audit_record(admin_client, make_token):
    token = make_token()
    admin_client.post(
        reverse("admin:tokens_baomingtoken_changelist"), {"action": "delete_with_audit", "_selected_action": [token.pk]}
    )
    assert not BaomingToken.objects.exists()
    audit = TokenDeletion.objects.get()
    assert (audit.reason, audit.actor, audit.token_masked) == (
        DeletionReason.ADMIN,
        admin_client.user,
        token.masked_token,
    )


def test_run_history_is_read_only(admin_client):
    run = RefreshRun.objects.create(kind=RunKind.REFRESH, trigger="beat")
    assert admin_client.get(reverse("admin:tokens_refreshrun_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:tokens_refreshrun_change", args=[run.pk])).status_code == 200
    assert admin_client.get(reverse("admin:tokens_refreshrun_add")).status_code == 403
    assert (
        admin_client.post(reverse("admin:tokens_refreshrun_delete", args=[run.pk]), {"post": "yes"}).status_code == 403
    )


# --- find by token without putting it in a URL (issue defect 12) --------------------------------


def test_find_by_token_posts_and_redirects_to_the_row_by_id(admin_client, make_token):
    make_token()
    target = make_token(card_name="目标")
    find_url = reverse("admin:tokens_baomingtoken_find")
    assert target.token not in find_url
    form = admin_client.get(find_url)
    assert form.status_code == 200 and 'method="post"' in form.content.decode()
    response = admin_client.post(find_url, {"token": f"  {target.token.upper()} "})
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:tokens_baomingtoken_change", args=[target.pk])
    assert target.token not in response["Location"].lower()


def test_find_by_token_says_when_nothing_matches_without_echoing_it(admin_client, make_token):
    make_token()
    missing = new_token_value()
    response = admin_client.post(reverse("admin:tokens_baomingtoken_find"), {"token": missing})
    body = response.content.decode()
    assert response.status_code == 200
    assert missing not in body
    assert "没有找到" in body


def test_find_by_token_refuses_what_is_not_a_token(admin_client):
    response = admin_client.post(reverse("admin:tokens_baomingtoken_find"), {"token": "abc"})
    assert response.status_code == 200 and "32" in response.content.decode()


def test_find_by_token_is_csrf_protected(make_token):
    from django.test import Client

    token = make_token()
    client = Client(enforce_csrf_checks=True)
    client.force_login(get_user_model().objects.create_superuser("ops2", "o2@example.com", "pw-ops-123456"))
    response = client.post(reverse("admin:tokens_baomingtoken_find"), {"token": token.token})
    assert response.status_code == 403


def test_find_by_token_needs_a_staff_login(client, make_token):
    token = make_token()
    response = client.post(reverse("admin:tokens_baomingtoken_find"), {"token": token.token})
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert token.token not in response["Location"]


def test_the_token_list_links_to_find_by_token(admin_client):
    body = admin_client.get(reverse("admin:tokens_baomingtoken_changelist")).content.decode()
    assert reverse("admin:tokens_baomingtoken_find") in body


def test_search_box_no_longer_matches_a_pasted_token_and_points_to_the_form(admin_client, make_token):
    token = make_token()
    response = admin_client.get(reverse("admin:tokens_baomingtoken_changelist"), {"q": token.token})
    assert list(response.context["cl"].result_list) == []
    messages = [str(m) for m in response.context["messages"]]
    assert any(reverse("admin:tokens_baomingtoken_find") in m or "按 Token 查找" in m for m in messages)
