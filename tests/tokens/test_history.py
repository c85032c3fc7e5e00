"""Per-token check history: one bulk insert per batch, bounded per token, visible in the admin
(also for a deleted token, beside its deletion record)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests.conftest import invalid, json_answer, server_error, throttled
from tokens.models import BaomingToken, RefreshRun, TokenCheckRecord, TokenDeletion
from tokens.services.refresh import token_refresh_run

pytestmark = pytest.mark.django_db

logged_out = json_answer({"sta": -1, "msg": "登录已过期，请重新登录", "data": None})


def run(**kwargs) -> RefreshRun:
    kwargs.setdefault("trigger", "command")
    return token_refresh_run(**kwargs)


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    return client


def test_each_check_is_recorded_with_its_outcome_message_status_and_run(upstream, make_token, settings):
    settings.BAOMING_RATE_LIMIT_RETRIES = 0
    good, dead, suspect, flaky, busy = (make_token() for _ in range(5))
    make_token()  # so that one invalid answer of six does not trip the breaker
    upstream.answers[dead.token] = invalid
    upstream.answers[suspect.token] = logged_out
    upstream.answers[flaky.token] = server_error
    upstream.answers[busy.token] = throttled
    result = run()
    records = {r.token_pk: r for r in TokenCheckRecord.objects.filter(run=result)}
    assert len(records) == 6
    assert (records[good.pk].outcome, records[good.pk].message, records[good.pk].http_status) == ("valid", "ok", 200)
    assert (records[dead.pk].outcome, records[dead.pk].message) == ("invalid", "invalid access_token")
    assert records[suspect.pk].outcome == "suspect" and "登录已过期" in records[suspect.pk].message
    assert (records[flaky.pk].outcome, records[flaky.pk].http_status) == ("transient", 500)
    assert records[busy.pk].outcome == "rate_limited"
    assert all(abs(r.checked_at - timezone.now()) < timedelta(minutes=1) for r in records.values())
    # the dead token is gone; its history stays
    assert not BaomingToken.objects.filter(pk=dead.pk).exists()
    assert TokenCheckRecord.objects.filter(token_pk=dead.pk).count() == 1


def test_messages_are_short_and_scrubbed_of_secrets(upstream, make_token):
    token = make_token()
    other = "0123456789abcdef0123456789abcdef"
    upstream.answers[token.token] = json_answer(
        {"sta": -1, "msg": f"失败 {other} access_token={token.token} " + "x" * 500}
    )
    run()
    record = TokenCheckRecord.objects.get(token_pk=token.pk)
    assert len(record.message) <= 200
    assert token.token not in record.message and other not in record.message


def history_queries(make_token, count: int) -> tuple[int, int]:
    """(all queries, inserts into the history) of a one-batch run over ``count`` fresh tokens."""
    ids = [make_token().pk for _ in range(count)]
    with CaptureQueriesContext(connection) as queries:
        result = run(token_ids=ids)
    assert (result.total, result.batches_total) == (count, 1)
    inserts = [q for q in queries.captured_queries if q["sql"].startswith('INSERT INTO "tokens_tokencheckrecord"')]
    return len(queries.captured_queries), len(inserts)


def test_history_is_one_insert_per_batch_whatever_its_size(upstream, make_token):
    small = history_queries(make_token, 3)
    large = history_queries(make_token, 60)
    assert small[1] == large[1] == 1
    assert small[0] == large[0]


def test_every_batch_of_a_run_writes_its_own_history(upstream, make_token, settings):
    settings.BAOMING_BATCH_SIZE = 4
    tokens = [make_token() for _ in range(10)]
    result = run()
    assert result.batches_total == 3
    assert TokenCheckRecord.objects.filter(run=result).count() == 10
    assert set(TokenCheckRecord.objects.values_list("token_pk", flat=True)) == {t.pk for t in tokens}


def test_history_is_bounded_to_the_newest_50_per_token(upstream, make_token):
    checked, untouched = make_token(), make_token()
    old = timezone.now() - timedelta(days=30)
    for token in (checked, untouched):
        TokenCheckRecord.objects.bulk_create(
            TokenCheckRecord(
                token_pk=token.pk, outcome="valid", message=f"old {n}", checked_at=old + timedelta(hours=n)
            )
            for n in range(60)
        )
    result = run(token_ids=[checked.pk])
    kept = list(TokenCheckRecord.objects.filter(token_pk=checked.pk).order_by("-checked_at", "-id"))
    assert len(kept) == 50
    assert kept[0].run_id == result.pk  # the newest is this run's
    assert kept[-1].message == "old 11"  # the oldest ten went
    assert TokenCheckRecord.objects.filter(token_pk=untouched.pk).count() == 60  # not in the batch: not trimmed


def test_history_bound_is_a_setting(upstream, make_token, settings):
    settings.TOKEN_HISTORY_PER_TOKEN = 2
    token = make_token()
    for _ in range(4):
        run()
    assert TokenCheckRecord.objects.filter(token_pk=token.pk).count() == 2


def test_a_dry_run_keeps_no_history(upstream, make_token):
    make_token()
    run(dry_run=True)
    assert not TokenCheckRecord.objects.exists()


# --- admin --------------------------------------------------------------------------------------


def test_the_token_page_shows_its_recent_checks_with_a_link_to_each_run(admin_client, upstream, make_token):
    token = make_token()
    upstream.answers[token.token] = [logged_out, server_error]
    first, second = run(), run()
    body = admin_client.get(reverse("admin:tokens_baomingtoken_change", args=[token.pk])).content.decode()
    assert "登录已过期" in body and "HTTP 500" in body
    for result in (first, second):
        assert reverse("admin:tokens_refreshrun_change", args=[result.pk]) in body
    assert body.index("HTTP 500") < body.index("登录已过期")  # newest first
    assert token.token not in body


def test_the_token_page_reads_its_history_in_one_query(admin_client, make_token):
    few, many = make_token(), make_token()
    runs = [RefreshRun.objects.create(trigger="command") for _ in range(3)]
    TokenCheckRecord.objects.create(token_pk=few.pk, outcome="valid", message="ok", run=runs[0])
    TokenCheckRecord.objects.bulk_create(
        TokenCheckRecord(token_pk=many.pk, outcome="transient", message=f"m{n}", run=runs[n % 3]) for n in range(40)
    )

    def queries(token: BaomingToken) -> int:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(reverse("admin:tokens_baomingtoken_change", args=[token.pk]))
        assert response.status_code == 200
        return len(captured.captured_queries)

    assert queries(few) == queries(many)


def test_a_deleted_tokens_history_stays_visible_beside_its_deletion_record(admin_client, upstream, make_token):
    token = make_token(card_name="已删名片")
    make_token()
    upstream.answers[token.token] = [server_error, invalid]
    first, second = run(), run()
    assert second.deleted == 1
    deletion = TokenDeletion.objects.get(token_pk=token.pk)
    body = admin_client.get(reverse("admin:tokens_tokendeletion_change", args=[deletion.pk])).content.decode()
    assert "invalid access_token" in body and "HTTP 500" in body
    assert reverse("admin:tokens_refreshrun_change", args=[first.pk]) in body
    assert reverse("admin:tokens_refreshrun_change", args=[second.pk]) in body


def test_a_token_never_checked_says_so(admin_client, make_token):
    token = make_token()
    body = admin_client.get(reverse("admin:tokens_baomingtoken_change", args=[token.pk])).content.decode()
    assert "尚无检查记录" in body
