"""The admin home's overview: counts that link to exactly their rows, charts, bounded queries."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease, TeamHealth
from leases.services.orphans import ORPHANS_ALERT_KEY
from leasesite.models import AlertState
from leasesite.overview import leases_per_status
from tokens.models import RefreshRun, RunKind, RunStatus, RunTrigger

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123456")
    client.force_login(user)
    return client


def figures(html: str) -> dict[str, tuple[int, str]]:
    """{label: (count, link)} of the overview's figures."""
    found = re.findall(
        r'<a href="([^"]+)" class="[^"]*" data-figure="\d+">\s*<span class="count">(\d+)</span>'
        r'<span class="label">([^<]+)</span>',
        html,
    )
    return {label: (int(count), url.replace("&amp;", "&")) for url, count, label in found}


def make_world(make_team, make_lease, make_token, *, size: int) -> None:
    now = timezone.now()
    healthy = make_team("healthy-team", capacity=size * 4)
    broken = make_team("broken-team", capacity=size * 4)
    broken.health = TeamHealth.DEAD
    broken.save(update_fields=["health"])
    syncing = make_team("sync-error-team", capacity=5)
    syncing.last_sync_error = "GET members: HTTP 500"
    syncing.save(update_fields=["last_sync_error"])
    for _ in range(size):
        make_lease(healthy, LeaseStatus.ACTIVE)
        make_lease(broken, LeaseStatus.FAILED, last_error="invite to healthy-team failed")
        make_lease(healthy, LeaseStatus.ACTIVE, expires_at=now - timedelta(hours=1))  # overdue
        make_token(consecutive_failures=1, last_checked_at=now)
        make_token(consecutive_failures=0, last_checked_at=now)
    for n in range(size):
        RefreshRun.objects.create(
            kind=RunKind.REFRESH,
            trigger=RunTrigger.BEAT,
            status=RunStatus.SUCCEEDED,
            started_at=now - timedelta(hours=n),
            total=10,
            ok=8,
            failed=2,
            invalid=1,
        )


def test_the_overview_counts_what_is_wrong_and_links_to_exactly_those_rows(operator, make_team, make_lease, make_token):
    make_world(make_team, make_lease, make_token, size=3)
    suspect = make_token()
    suspect.suspect_count, suspect.suspect_since = 2, timezone.now()
    suspect.save(update_fields=["suspect_count", "suspect_since"])
    html = operator.get("/admin/").content.decode()
    shown = figures(html)
    assert shown["需人工处理的失败租约"][0] == 3
    assert shown["逾期未转移的租约"][0] == 3
    assert shown["不健康或同步失败的团队"][0] == 2
    assert shown["检查失败的 Token"][0] == 3
    assert shown["可疑的 Token（可能已登出）"][0] == 1
    for label, (count, url) in shown.items():
        listing = operator.get(url)
        assert listing.status_code == 200, (label, url)
        # The changelist the figure links to holds exactly that many rows.
        match = re.search(r'<span class="small quiet">(\d+) 条结果', listing.content.decode()) or re.search(
            r'class="paginator">\s*(\d+)', listing.content.decode()
        )
        assert match and int(match.group(1)) == count, (label, url, count)


def test_the_overview_shows_the_latest_runs_the_next_runs_and_the_orphan_findings(operator):
    run = RefreshRun.objects.create(
        kind=RunKind.REFRESH, trigger=RunTrigger.BEAT, status=RunStatus.FAILED, total=4, ok=1, failed=3, deleted=0
    )
    every = IntervalSchedule.objects.create(every=30, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.create(name="每 30 分钟刷新", task="tokens.refresh_tokens", interval=every)
    AlertState.objects.create(
        key=ORPHANS_ALERT_KEY, active=True, since=timezone.now(), last_title="孤立成员：2 个团队中有 3 个"
    )
    html = operator.get("/admin/").content.decode()
    assert f"/admin/tokens/refreshrun/{run.pk}/change/" in html
    assert "4 个已检查，1 个正常，3 个失败，0 个已删除" in html
    assert "从未运行" in html  # no cleanup run yet
    assert "每 30 分钟刷新" in html
    assert "孤立成员：2 个团队中有 3 个" in html
    assert "/admin/leasesite/alertstate/" in html
    assert html.count("<svg") >= 3
    assert "leasesite 控制台" in html


def test_the_overview_costs_the_same_queries_for_3_or_30_of_everything(operator, make_team, make_lease, make_token):
    make_world(make_team, make_lease, make_token, size=3)
    with CaptureQueriesContext(connection) as small:
        assert operator.get("/admin/").status_code == 200
    make_world_more(make_team, make_lease, make_token)
    with CaptureQueriesContext(connection) as large:
        assert operator.get("/admin/").status_code == 200
    assert len(large) == len(small), [q["sql"][:120] for q in large.captured_queries]
    assert len(large) <= 25


def make_world_more(make_team, make_lease, make_token) -> None:
    team = make_team("another-team", capacity=100)
    for _ in range(30):
        make_lease(team, LeaseStatus.FAILED)
        make_token(consecutive_failures=2, last_checked_at=timezone.now())
        RefreshRun.objects.create(kind=RunKind.REFRESH, trigger=RunTrigger.BEAT, status=RunStatus.SUCCEEDED)


def test_a_clerk_sees_only_the_sections_of_what_they_may_view(client, make_team, make_lease, make_token):
    make_world(make_team, make_lease, make_token, size=1)
    clerk = get_user_model().objects.create_user("clerk", "clerk@example.com", "pw-clerk-123456", is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="view_memberlease"))
    client.force_login(clerk)
    html = client.get("/admin/").content.decode()
    shown = figures(html)
    assert "需人工处理的失败租约" in shown
    assert not any("Token" in label for label in shown)
    assert "/admin/tokens/refreshrun/" not in html
    assert "healthy-team" not in html  # the seats chart belongs to the team section


def test_leases_per_status_walks_the_status_changes_back_day_by_day(make_team):
    now = timezone.now()
    team = make_team("alpha")
    lease = MemberLease.objects.create(
        team=team,
        email="walk@example.com",
        term_months=1,
        status=LeaseStatus.ACTIVE,
        joined_at=now - timedelta(days=10),
        expires_at=now + timedelta(days=20),
    )
    LeaseEvent.objects.create(
        lease=lease,
        action=LeaseAction.REDEEMED,
        to_status=LeaseStatus.ACTIVE,
        created_at=now - timedelta(days=10),
    )
    # Failed five days ago: before that it was active.
    LeaseEvent.objects.create(
        lease=lease,
        action=LeaseAction.TRANSFER_FAILED,
        from_status=LeaseStatus.ACTIVE,
        to_status=LeaseStatus.FAILED,
        created_at=now - timedelta(days=5),
    )
    lease.status = LeaseStatus.FAILED
    lease.save(update_fields=["status"])
    days, series, _segments = leases_per_status(now)
    assert len(days) == 30 and days[-1] == "现在"
    assert series["failed"][-1] == 1 and series["active"][-1] == 0
    assert series["active"][-8] == 1 and series["failed"][-8] == 0  # a week ago
    assert series["active"][-20] == 0 and series["failed"][-20] == 0  # before it existed


def test_team_names_in_the_chart_are_escaped(operator, make_team):
    make_team("<script>alert(1)</script>")
    html = operator.get("/admin/").content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html


def test_the_overview_shows_seats_per_pool_and_the_waiting_list(operator, make_team, make_lease):
    make_team("vip-1", capacity=4, pool="vip")
    full = make_team("std-1", capacity=1)
    make_lease(full, LeaseStatus.ACTIVE)
    make_lease(None, LeaseStatus.WAITING, email="queued@example.com")
    html = operator.get("/admin/").content.decode()
    shown = figures(html)
    assert shown["排队中的租约"][0] == 1
    table = html.split('id="pools"')[1].split("</table>")[0]
    rows = re.findall(
        r"<tr><td><a [^>]+>([^<]+)</a></td><td>(\d+)</td><td>(\d+) / (\d+)</td><td>(\d+)</td></tr>", table
    )
    assert rows == [("default", "0", "1", "1", "1"), ("vip", "4", "0", "4", "0")]
