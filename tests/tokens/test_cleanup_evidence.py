"""Cleanup deletes only tokens the upstream had a chance to vouch for (issue defect 4): our own
failure to reach the upstream is never evidence against a token."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from werkzeug.wrappers import Response

from tests.conftest import invalid, json_answer, ok, server_error
from tokens.models import BaomingToken, RefreshRun, RunKind, RunStatus, RunTrigger, TokenDeletion
from tokens.services.cleanup import token_cleanup_run
from tokens.services.refresh import token_refresh_run
from tokens.tasks import cleanup_tokens

pytestmark = pytest.mark.django_db

not_open_yet = json_answer({"sta": -1, "msg": "报名未开始", "data": None})  # a business answer


def old(days: int) -> object:
    return timezone.now() - timedelta(days=days)


def refresh(**kwargs) -> RefreshRun:
    return token_refresh_run(trigger=RunTrigger.COMMAND, **kwargs)


def cleanup_runs() -> list[RefreshRun]:
    return list(RefreshRun.objects.filter(kind=RunKind.CLEANUP).order_by("id"))


def test_cleanup_right_after_an_outage_skips_and_deletes_nothing(upstream, make_token, capsys):
    stale = [make_token(last_used=old(40)) for _ in range(2)]
    fresh = make_token()
    for token in stale:
        upstream.answers[token.token] = not_open_yet
    assert refresh().status == RunStatus.SUCCEEDED  # the upstream answered for every token

    for token in [*stale, fresh]:
        upstream.answers[token.token] = server_error  # now it is down
    with pytest.raises(CommandError):
        call_command("refresh_baoming_tokens", "--cleanup-days", "30")
    assert BaomingToken.objects.count() == 3 and not TokenDeletion.objects.exists()
    (skipped,) = cleanup_runs()
    assert skipped.status == RunStatus.SKIPPED and skipped.deleted == 0
    assert f"#{RefreshRun.objects.filter(kind=RunKind.REFRESH).latest('id').pk}" in skipped.error
    assert "skipped" in capsys.readouterr().out

    upstream.answers.clear()
    for token in stale:
        upstream.answers[token.token] = not_open_yet  # the upstream is back
    call_command("refresh_baoming_tokens", "--cleanup-days", "30")
    assert list(BaomingToken.objects.values_list("id", flat=True)) == [fresh.pk]
    assert cleanup_runs()[-1].status == RunStatus.SUCCEEDED


def test_cleanup_deletes_only_stale_tokens_the_upstream_answered_for(upstream, make_token):
    answered = make_token(last_used=old(40))
    never_reached = make_token(created_at=old(40))
    fresh = make_token()
    upstream.answers[answered.token] = not_open_yet
    upstream.answers[never_reached.token] = server_error
    call_command("refresh_baoming_tokens", "--cleanup-days", "30")
    assert set(BaomingToken.objects.values_list("id", flat=True)) == {never_reached.pk, fresh.pk}
    assert TokenDeletion.objects.get().token_pk == answered.pk


def test_a_token_answered_only_long_ago_is_kept(make_token):
    make_token(last_used=old(90), last_answered_at=old(60))
    run = token_cleanup_run(days=30, trigger=RunTrigger.COMMAND)
    assert (run.status, run.deleted) == (RunStatus.SUCCEEDED, 0)
    assert BaomingToken.objects.count() == 1


@pytest.mark.parametrize("status", [RunStatus.FAILED, "interrupted", RunStatus.ABANDONED, RunStatus.TRIPPED])
def test_cleanup_task_skips_while_the_latest_refresh_could_not_vouch(make_token, status, caplog):
    token = make_token(last_used=old(40), last_answered_at=old(1))
    RefreshRun.objects.create(kind=RunKind.REFRESH, trigger="beat", status=RunStatus.SUCCEEDED, total=5, ok=5)
    latest = RefreshRun.objects.create(kind=RunKind.REFRESH, trigger="beat", status=status, total=5, ok=1)
    with caplog.at_level(logging.WARNING):
        run = RefreshRun.objects.get(pk=cleanup_tokens(days=30))
    assert run.status == RunStatus.SKIPPED and f"#{latest.pk}" in run.error
    assert BaomingToken.objects.filter(pk=token.pk).exists()
    assert run.error in caplog.text


def test_cleanup_skips_when_the_latest_refresh_confirmed_no_token_valid(make_token):
    make_token(last_used=old(40), last_answered_at=old(1))
    RefreshRun.objects.create(
        kind=RunKind.REFRESH, trigger="beat", status=RunStatus.SUCCEEDED, total=5, ok=0, invalid=1, failed=4
    )
    assert token_cleanup_run(days=30, trigger=RunTrigger.COMMAND).status == RunStatus.SKIPPED


def test_an_empty_or_dry_refresh_does_not_hide_a_failed_one(make_token):
    make_token(last_used=old(40), last_answered_at=old(1))
    failed = RefreshRun.objects.create(kind=RunKind.REFRESH, trigger="beat", status=RunStatus.FAILED, total=5)
    RefreshRun.objects.create(kind=RunKind.REFRESH, trigger="beat", status=RunStatus.SUCCEEDED, total=0)
    RefreshRun.objects.create(
        kind=RunKind.REFRESH, trigger="command", status=RunStatus.SUCCEEDED, dry_run=True, total=5, ok=5
    )
    run = token_cleanup_run(days=30, trigger=RunTrigger.COMMAND)
    assert run.status == RunStatus.SKIPPED and f"#{failed.pk}" in run.error


def test_cleanup_command_skips_with_exit_status_75(make_token, capsys):
    make_token(last_used=old(40), last_answered_at=old(1))
    RefreshRun.objects.create(kind=RunKind.REFRESH, trigger="beat", status=RunStatus.FAILED, total=5)
    with pytest.raises(CommandError) as excinfo:
        call_command("cleanup_baoming_tokens", "--days", "30")
    assert excinfo.value.returncode == 75
    assert "skipped" in capsys.readouterr().out
    assert BaomingToken.objects.count() == 1


def test_which_answers_count_as_the_upstream_answering(upstream, make_token, settings):
    settings.BAOMING_RATE_LIMIT_RETRIES = 0
    valid = make_token()
    business = make_token()
    dead = make_token()
    down = make_token()
    garbage = make_token()
    throttled = make_token()
    upstream.answers[business.token] = not_open_yet
    upstream.answers[dead.token] = invalid
    upstream.answers[down.token] = server_error
    upstream.answers[garbage.token] = lambda: Response("<html>maintenance</html>", status=200)
    upstream.answers[throttled.token] = json_answer({}, status=429, headers={"Retry-After": "0"})
    upstream.answers[valid.token] = ok
    settings.BAOMING_BREAKER_THRESHOLD = 0.9  # keep the one invalid token out of the breaker's way
    refresh()
    answered = set(BaomingToken.objects.filter(last_answered_at__isnull=False).values_list("id", flat=True))
    assert answered == {valid.pk, business.pk}  # the invalid one was deleted
    assert not BaomingToken.objects.filter(pk=dead.pk).exists()


def test_an_invalid_answer_kept_by_the_breaker_counts_as_answered(upstream, make_token):
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    assert refresh().status == RunStatus.TRIPPED
    assert BaomingToken.objects.filter(last_answered_at__isnull=False).count() == 3
