"""The console shows each token's health (valid / failing / suspect / not checked), since when, the
last message and the suspect count, and filters by health."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from tokens.models import TokenHealth

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    return client


@pytest.fixture
def tokens_in_every_health(make_token) -> dict[str, object]:
    now = timezone.now()
    return {
        TokenHealth.VALID: make_token(card_name="甲名片", last_checked_at=now, last_used=now),
        TokenHealth.FAILING: make_token(
            card_name="乙名片",
            last_checked_at=now,
            consecutive_failures=2,
            failing_since=now - timedelta(hours=5),
            last_error="HTTP 502",
        ),
        TokenHealth.SUSPECT: make_token(
            card_name="丙名片",
            last_checked_at=now,
            consecutive_failures=2,
            suspect_count=2,
            suspect_since=now - timedelta(hours=3),
            failing_since=now - timedelta(hours=3),
            last_error="sta=-1: 登录已过期",
        ),
        TokenHealth.UNCHECKED: make_token(card_name="丁名片"),
    }


def test_each_token_has_the_health_its_fields_say(tokens_in_every_health):
    for health, token in tokens_in_every_health.items():
        assert token.health == health


@pytest.mark.parametrize("health", list(TokenHealth))
def test_the_list_filters_by_health(admin_client, tokens_in_every_health, health):
    url = reverse("admin:tokens_baomingtoken_changelist")
    response = admin_client.get(url, {"health": health.value})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [tokens_in_every_health[health]]


def test_the_list_shows_health_since_when_the_last_message_and_the_suspect_count(admin_client, tokens_in_every_health):
    body = admin_client.get(reverse("admin:tokens_baomingtoken_changelist")).content.decode()
    suspect = tokens_in_every_health[TokenHealth.SUSPECT]
    row = body[body.index("丙名片") :].split("</tr>", 1)[0]
    assert "可疑（可能已退出登录）" in row and "登录已过期" in row
    assert timezone.localtime(suspect.suspect_since).strftime("%Y-%m-%d %H:%M") in row
    assert ">2<" in row  # suspect answers in a row
    failing_row = body[body.index("乙名片") :].split("</tr>", 1)[0]
    failing = tokens_in_every_health[TokenHealth.FAILING]
    assert "HTTP 502" in failing_row
    assert timezone.localtime(failing.failing_since).strftime("%Y-%m-%d %H:%M") in failing_row
    unchecked_row = body[body.index("丁名片") :].split("</tr>", 1)[0]
    assert "尚未检查" in unchecked_row
    assert "失败中" in failing_row


def test_the_token_page_shows_health_since_and_the_last_message(admin_client, tokens_in_every_health):
    suspect = tokens_in_every_health[TokenHealth.SUSPECT]
    body = admin_client.get(reverse("admin:tokens_baomingtoken_change", args=[suspect.pk])).content.decode()
    assert "可疑（可能已退出登录）" in body and "登录已过期" in body
    assert timezone.localtime(suspect.suspect_since).strftime("%Y-%m-%d %H:%M") in body
