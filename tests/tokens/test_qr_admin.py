"""The admin's "扫码添加 Token" pages with the Django test client, against the bundled fake
报名工具 server: the views only read the login row (the fake records no request while they
run); the poll task's body runs in-process between page loads."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from leasesite.fakes.baoming_server import FakeBaomingServer, fake_qr_scan
from tests.tokens import qr_fixtures
from tests.tokens.qr_fixtures import answer
from tokens.admin_qr import demo_scan_enabled
from tokens.models import BaomingToken, QrLogin, QrLoginStatus
from tokens.services.qrlogin import qr_login_tick

# The QR fixtures (a module of their own, not tests/conftest.py).
fake_baoming = qr_fixtures.fake_baoming
qr_upstream = qr_fixtures.qr_upstream
pytestmark = pytest.mark.django_db

SCAN_URL = "admin:tokens_baomingtoken_scan"


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    client.user = user
    return client


class NoUpstreamCalls:
    """Asserts the fake upstream received no API request inside the block."""

    def __init__(self, server: FakeBaomingServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        self.before = len(self.server.state.arrivals)

    def __exit__(self, *exc: object) -> None:
        assert len(self.server.state.arrivals) == self.before, "a view called the upstream"


def run_poll_ticks(login: QrLogin, count: int = 1) -> QrLogin:
    """What the worker does: the task's body, tick after tick (the next tick is not queued)."""
    for _ in range(count):
        login.refresh_from_db()
        qr_login_tick(login_id=login.pk, tick=login.polls, schedule_next=lambda *args: None)
    login.refresh_from_db()
    return login


def start(admin_client, card_name: str, django_capture_on_commit_callbacks) -> tuple[QrLogin, list]:
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse(SCAN_URL), {"card_name": card_name})
    login = QrLogin.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk])
    return login, callbacks


def test_the_token_list_links_to_the_scan_page(admin_client):
    body = admin_client.get(reverse("admin:tokens_baomingtoken_changelist")).content.decode()
    assert reverse(SCAN_URL) in body and "扫码添加 Token" in body


def test_scan_from_start_to_the_new_tokens_page(admin_client, fake_baoming, django_capture_on_commit_callbacks):
    with NoUpstreamCalls(fake_baoming):
        assert "显示二维码" in admin_client.get(reverse(SCAN_URL)).content.decode()
        login, callbacks = start(admin_client, "张三", django_capture_on_commit_callbacks)
    assert len(callbacks) == 1  # tokens.qr_login_poll, queued after commit (not run here)
    assert (login.card_name, login.status, login.requested_by) == ("张三", QrLoginStatus.STARTING, admin_client.user)
    page_url = reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk])
    status_url = reverse("admin:tokens_baomingtoken_scan_status", args=[login.pk])

    with NoUpstreamCalls(fake_baoming):
        body = admin_client.get(page_url).content.decode()
        state = admin_client.get(status_url).json()
    assert "正在从报名工具获取二维码" in body and 'class="segno"' not in body
    assert (state["status"], state["open"], state["has_qr"]) == ("starting", True, False)

    login = run_poll_ticks(login)  # the worker fetches the QR code
    with NoUpstreamCalls(fake_baoming):
        body = admin_client.get(page_url).content.decode()
        state = admin_client.get(status_url).json()
    assert re.search(r"<svg[^>]*class=\"segno\"", body), "the QR code is an inline SVG rendered by us"
    assert "statusUrl" in body and "cdn" not in body.lower()  # polls its own status view, no CDN
    assert login.code not in body and login.code not in json.dumps(state)
    assert (state["status"], state["has_qr"]) == ("waiting", True) and 0 < state["seconds_left"] <= 180
    assert "模拟扫码" not in body  # not a demo

    fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"uname": "小明", "unionid": "o-admin"})
    login = run_poll_ticks(login)
    token = BaomingToken.objects.get()
    with NoUpstreamCalls(fake_baoming):
        state = admin_client.get(status_url).json()
        response = admin_client.get(page_url, follow=True)
    assert (state["status"], state["open"]) == ("succeeded", False)
    assert response.redirect_chain[-1][0] == reverse("admin:tokens_baomingtoken_change", args=[token.pk])
    body = response.content.decode()
    assert f"已添加 Token #{token.pk}" in body and "小明" in body
    assert token.token not in body
    assert (token.card_name, token.unionid) == ("张三", "o-admin")


def test_a_second_scan_by_the_same_person_lands_on_the_same_row(
    admin_client, fake_baoming, make_token, django_capture_on_commit_callbacks
):
    existing = make_token(card_name="张三", unionid="o-again")
    login, _ = start(admin_client, "张三", django_capture_on_commit_callbacks)
    login = run_poll_ticks(login)
    fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"unionid": "o-again"})
    login = run_poll_ticks(login)
    response = admin_client.get(reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk]), follow=True)
    assert response.redirect_chain[-1][0] == reverse("admin:tokens_baomingtoken_change", args=[existing.pk])
    assert "已替换为新 Token，历史记录保留" in response.content.decode()
    assert login.replaced and BaomingToken.objects.count() == 1


def test_a_picture_answer_is_shown_as_is(admin_client, settings, django_capture_on_commit_callbacks):
    with FakeBaomingServer(qr_picture=True) as server:
        settings.BAOMING_API_BASE = server.url
        from tokens.clients import _cached_client

        _cached_client.cache_clear()
        login, _ = start(admin_client, "张三", django_capture_on_commit_callbacks)
        login = run_poll_ticks(login)
        body = admin_client.get(reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk])).content.decode()
    _cached_client.cache_clear()
    assert f'<img src="{login.qrcode}"' in body and login.qrcode.startswith("data:image/png;base64,")


def test_an_expired_login_says_so_and_offers_to_try_again(
    admin_client, fake_baoming, django_capture_on_commit_callbacks
):
    login, _ = start(admin_client, "张 三", django_capture_on_commit_callbacks)
    login = run_poll_ticks(login)
    QrLogin.objects.filter(pk=login.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    page_url = reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk])
    status_url = reverse("admin:tokens_baomingtoken_scan_status", args=[login.pk])
    with NoUpstreamCalls(fake_baoming):
        # Past its expiry the page says expired even before a worker closes the row.
        assert admin_client.get(status_url).json()["status"] == "expired"
        body = admin_client.get(page_url).content.decode()
    assert "已到期" in body and 'class="segno"' not in body and "statusUrl" not in body
    assert f"{reverse(SCAN_URL)}?card_name=%E5%BC%A0+%E4%B8%89" in body
    login = run_poll_ticks(login)
    assert login.status == QrLoginStatus.EXPIRED
    assert "二维码未在限定时间内被扫描" in admin_client.get(page_url).content.decode()
    again = admin_client.get(reverse(SCAN_URL), {"card_name": "张 三"}).content.decode()
    assert 'value="张 三"' in again


def test_a_refused_qr_code_fails_with_its_reason(admin_client, qr_upstream, django_capture_on_commit_callbacks):
    qr_upstream.code_answers[:] = [answer({"sta": -7, "msg": "维护中"})]
    login, _ = start(admin_client, "x", django_capture_on_commit_callbacks)
    login = run_poll_ticks(login)
    body = admin_client.get(reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk])).content.decode()
    assert login.status == QrLoginStatus.FAILED
    assert "报名工具 API 未返回二维码：sta=-7: 维护中" in body and "重试" in body


def test_cancel(admin_client, fake_baoming, django_capture_on_commit_callbacks):
    login, _ = start(admin_client, "x", django_capture_on_commit_callbacks)
    login = run_poll_ticks(login)
    with NoUpstreamCalls(fake_baoming):
        response = admin_client.post(reverse("admin:tokens_baomingtoken_scan_cancel", args=[login.pk]), follow=True)
    assert "登录已取消" in response.content.decode()
    login.refresh_from_db()
    assert (login.status, login.code) == (QrLoginStatus.CANCELLED, "")
    assert run_poll_ticks(login).status == QrLoginStatus.CANCELLED  # the next tick does nothing


def test_bad_card_names_start_nothing(admin_client):
    for bad in ("", "   ", "x" * 101, "a\x07b"):
        response = admin_client.post(reverse(SCAN_URL), {"card_name": bad})
        assert response.status_code == 200 and response.context["form"].errors
    assert not QrLogin.objects.exists()


def test_staff_without_add_permission_cannot_scan(client, make_token):
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123456", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_baomingtoken"))
    client.force_login(user)
    assert reverse(SCAN_URL) not in client.get(reverse("admin:tokens_baomingtoken_changelist")).content.decode()
    assert client.get(reverse(SCAN_URL)).status_code == 403
    assert client.post(reverse(SCAN_URL), {"card_name": "x"}).status_code == 403
    assert not QrLogin.objects.exists()


def test_the_demo_scan_button_only_for_the_local_fake(
    admin_client, fake_baoming, settings, django_capture_on_commit_callbacks
):
    login, _ = start(admin_client, "张三", django_capture_on_commit_callbacks)
    login = run_poll_ticks(login)
    page_url = reverse("admin:tokens_baomingtoken_scan_login", args=[login.pk])
    demo_url = reverse("admin:tokens_baomingtoken_scan_demo", args=[login.pk])
    assert admin_client.post(demo_url).status_code == 404  # a real deployment has no such button

    settings.BAOMING_API_IS_FAKE = True
    assert demo_scan_enabled()
    body = admin_client.get(page_url).content.decode()
    assert "模拟扫码 (demo)" in body and demo_url in body
    response = admin_client.post(demo_url, follow=True)
    assert "已模拟微信用户" in response.content.decode()
    login = run_poll_ticks(login)
    assert login.status == QrLoginStatus.SUCCEEDED and login.token.user_name.startswith("扫码用户")

    settings.BAOMING_API_BASE = "http://upstream.example.com"  # the flag alone is not enough
    assert not demo_scan_enabled()


def test_the_page_says_when_no_worker_took_the_login(admin_client, django_capture_on_commit_callbacks):
    login, _ = start(admin_client, "x", django_capture_on_commit_callbacks)  # the task is never run
    status_url = reverse("admin:tokens_baomingtoken_scan_status", args=[login.pk])
    assert admin_client.get(status_url).json()["message"] == ""
    QrLogin.objects.filter(pk=login.pk).update(created_at=timezone.now() - timedelta(seconds=11))
    assert "Celery" in admin_client.get(status_url).json()["message"]
