"""The console's refresh runs: a run's page lists the tokens it deleted and its per-token results;
"refresh now" names the run holding the lock, or links to the run it queued."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.urls import reverse

from leasesite.locks import lock_acquire
from tests.conftest import invalid, server_error
from tokens.models import (
    CheckOutcomeChoice,
    DeletionReason,
    RefreshRun,
    RunStatus,
    RunTrigger,
    TokenCheckRecord,
    TokenDeletion,
)
from tokens.services.refresh import REFRESH_LOCK_NAME, token_refresh_run

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _english(settings):
    settings.LANGUAGE_CODE = "en"  # the new messages are not translated in the catalogue yet


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    return client


def run_page(admin_client, run: RefreshRun) -> str:
    response = admin_client.get(reverse("admin:tokens_refreshrun_change", args=[run.pk]))
    assert response.status_code == 200
    return response.content.decode()


def refresh_now(admin_client, tokens) -> tuple[object, list[str]]:
    response = admin_client.post(
        reverse("admin:tokens_baomingtoken_changelist"),
        {"action": "refresh_now", "_selected_action": [t.pk for t in tokens]},
    )
    assert response.status_code == 302
    return response, [str(message) for message in get_messages(response.wsgi_request)]


def test_run_page_lists_its_deleted_tokens_and_per_token_results(admin_client, upstream, make_token):
    good = make_token(card_name="甲名片", user_name="甲")
    bad = make_token(card_name="乙名片", user_name="乙")
    flaky = make_token(card_name="丙名片", user_name="丙")
    upstream.answers[bad.token] = invalid
    upstream.answers[flaky.token] = server_error
    run = token_refresh_run(trigger=RunTrigger.COMMAND)
    deletion = TokenDeletion.objects.get(token_pk=bad.pk)
    assert deletion.run_id == run.pk

    body = run_page(admin_client, run)

    deletion_url = reverse("admin:tokens_tokendeletion_change", args=[deletion.pk])
    deletions_url = f"{reverse('admin:tokens_tokendeletion_changelist')}?run__id__exact={run.pk}"
    checks_url = f"{reverse('admin:tokens_tokencheckrecord_changelist')}?run__id__exact={run.pk}"
    assert "Tokens this run deleted" in body and "Per-token results" in body
    assert f'href="{deletion_url}"' in body and deletion.token_masked in body
    assert f'href="{deletions_url}"' in body and f'href="{checks_url}"' in body
    for token in (good, flaky):  # still stored: linked to their own page
        assert f'href="{reverse("admin:tokens_baomingtoken_change", args=[token.pk])}"' in body
        assert f"{token.card_name} / {token.user_name}" in body
    assert "乙名片 / 乙</a> (deleted)" in body  # gone: linked to its deletion record
    assert "HTTP 500" in body and "invalid access_token" in body
    for token in (good, bad, flaky):
        assert token.token not in body

    for url in (deletion_url, deletions_url, checks_url):
        assert admin_client.get(url).status_code == 200
    listed = admin_client.get(deletions_url).context["cl"].result_list
    assert list(listed) == [deletion]
    checks = admin_client.get(checks_url).context["cl"].result_list
    assert {check.token_pk for check in checks} == {good.pk, bad.pk, flaky.pk}


def test_run_changelist_links_the_deleted_count_to_the_deletion_records(admin_client):
    run = RefreshRun.objects.create(trigger=RunTrigger.BEAT, status=RunStatus.SUCCEEDED, total=3, deleted=2)
    dry = RefreshRun.objects.create(
        trigger=RunTrigger.COMMAND, status=RunStatus.SUCCEEDED, total=3, deleted=2, dry_run=True
    )
    body = admin_client.get(reverse("admin:tokens_refreshrun_changelist")).content.decode()
    assert f"?run__id__exact={run.pk}" in body
    assert f"?run__id__exact={dry.pk}" not in body  # a dry run deleted nothing: no records to show


def test_run_page_with_many_results_is_bounded(admin_client, make_token, django_assert_max_num_queries):
    run = RefreshRun.objects.create(trigger=RunTrigger.BEAT, status=RunStatus.SUCCEEDED)
    stored = [make_token() for _ in range(120)]
    gone = [
        TokenDeletion(
            token_pk=10_000 + n,
            card_name=f"已删{n}",
            token_masked="abcd…wxyz",
            fingerprint=f"fp{n}",
            reason=DeletionReason.INVALID,
            run=run,
        )
        for n in range(230)
    ]
    TokenDeletion.objects.bulk_create(gone)
    token_ids = [t.pk for t in stored] + [d.token_pk for d in gone]
    TokenCheckRecord.objects.bulk_create(
        TokenCheckRecord(token_pk=token_id, run=run, outcome=CheckOutcomeChoice.VALID, message="ok")
        for token_id in token_ids
    )

    with django_assert_max_num_queries(12):
        body = run_page(admin_client, run)

    assert body.count('href="/admin/tokens/tokendeletion/') >= 200
    assert "Showing the first 200 of 230." in body  # deleted tokens
    assert "Showing the first 200 of 350." in body  # per-token results
    assert body.count('href="/admin/tokens/baomingtoken/') >= 120


def test_refresh_now_while_a_run_holds_the_lock_names_it_and_queues_nothing(
    admin_client, make_token, django_capture_on_commit_callbacks
):
    holder = RefreshRun.objects.create(trigger=RunTrigger.BEAT, status=RunStatus.RUNNING, lock_owner="owner-1")
    assert lock_acquire(name=REFRESH_LOCK_NAME, owner="owner-1", ttl_seconds=600)
    token = make_token()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        _response, texts = refresh_now(admin_client, [token])

    assert callbacks == []
    assert list(RefreshRun.objects.all()) == [holder]
    [text] = texts
    link = f'<a href="{reverse("admin:tokens_refreshrun_change", args=[holder.pk])}">#{holder.pk}</a>'
    assert f"Nothing queued: refresh run {link}" in text
    assert "trigger: beat" in text and "started " in text


def test_refresh_now_links_to_the_run_it_queued_and_that_run_gets_the_results(
    admin_client, upstream, make_token, django_capture_on_commit_callbacks, monkeypatch
):
    from tokens.tasks import refresh_batch

    tokens = [make_token(), make_token()]
    make_token()  # not selected
    upstream.answers[tokens[1].token] = invalid
    sent: list[int] = []
    monkeypatch.setattr(refresh_batch, "delay", sent.append)

    with django_capture_on_commit_callbacks(execute=True):
        _response, texts = refresh_now(admin_client, tokens)

    run = RefreshRun.objects.get()
    assert (run.trigger, run.planned) == (RunTrigger.ADMIN, 2)
    [text] = texts
    assert f'queued as run <a href="{reverse("admin:tokens_refreshrun_change", args=[run.pk])}">#{run.pk}</a>' in text
    assert sent == list(run.batches.values_list("id", flat=True))

    for batch_id in sent:  # what the workers do with the messages
        refresh_batch(batch_id)

    run.refresh_from_db()
    assert (run.status, run.total, run.ok, run.deleted) == (RunStatus.SUCCEEDED, 2, 1, 1)
    assert set(TokenCheckRecord.objects.filter(run=run).values_list("token_pk", flat=True)) == {t.pk for t in tokens}
    assert TokenDeletion.objects.get().run_id == run.pk
    body = run_page(admin_client, run)
    assert reverse("admin:tokens_baomingtoken_change", args=[tokens[0].pk]) in body
