"""End to end: the admin's scan page with a real Celery worker polling the bundled fake 报名工具
server through the real Redis broker."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from leasesite.fakes.baoming_server import QR_CODE_PATH, QR_LOGIN_PATH, fake_qr_scan
from tests.tokens import qr_fixtures
from tests.tokens.qr_fixtures import wait_for_login
from tokens.models import BaomingToken, QrLoginStatus

fake_baoming = qr_fixtures.fake_baoming
pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_admin_scan_with_a_real_worker(client, fake_baoming, start_workers):
    start_workers(1, BAOMING_API_BASE=fake_baoming.url)
    client.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456"))

    response = client.post(reverse("admin:tokens_baomingtoken_scan"), {"card_name": "张三"})
    assert response.status_code == 302
    login = wait_for_login(lambda login: login.status == QrLoginStatus.WAITING, timeout=90)
    page = client.get(response["Location"]).content.decode()
    assert 'class="segno"' in page

    fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"uname": "小明", "unionid": "o-worker"})
    login = wait_for_login(lambda login: login.status == QrLoginStatus.SUCCEEDED, timeout=60)
    token = BaomingToken.objects.get()
    assert (login.token_id, token.user_name, token.unionid) == (token.pk, "小明", "o-worker")
    final = client.get(response["Location"])
    assert final["Location"] == reverse("admin:tokens_baomingtoken_change", args=[token.pk])

    paths = [path for path, _ in fake_baoming.qr.requests]
    assert paths.count(QR_CODE_PATH) == 1 and paths.count(QR_LOGIN_PATH) == login.polls - 1
    time.sleep(2.5)  # an ended login is polled no more
    assert len(fake_baoming.qr.requests) == len(paths)
