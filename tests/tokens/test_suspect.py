"""Suspect answers (DESIGN §3): a failing answer that sounds logged out ("登录已过期") deletes a token
only after BAOMING_SUSPECT_LIMIT of them in a row spanning at least an hour, under the breaker."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from leasesite.models import AlertState
from tests.conftest import invalid, json_answer, ok, server_error
from tokens.models import (
    BaomingToken,
    DeletionReason,
    RunStatus,
    TokenCheckRecord,
    TokenDeletion,
    TokenHealth,
)
from tokens.services.refresh import token_refresh_run

pytestmark = pytest.mark.django_db
BASE = Path(__file__).resolve().parents[2]

logged_out = json_answer({"sta": -1, "msg": "登录已过期，请重新登录", "data": None})


def run(**kwargs):
    kwargs.setdefault("trigger", "command")
    return token_refresh_run(**kwargs)


def runs_at(time_machine, minutes: list[int], **kwargs) -> list:
    """One run at each of these minutes after now (the clock moved between them)."""
    start = timezone.now()
    results = []
    for minute in minutes:
        time_machine.move_to(start + timedelta(minutes=minute))
        results.append(run(**kwargs))
    return results


def test_three_suspect_answers_within_minutes_do_not_delete(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = logged_out
    start = timezone.now()
    results = runs_at(time_machine, [0, 1, 2])
    assert [r.deleted for r in results] == [0, 0, 0]
    assert [(r.ok, r.failed, r.invalid) for r in results] == [(0, 1, 0)] * 3
    token.refresh_from_db()
    assert (token.suspect_count, token.consecutive_failures) == (3, 3)
    assert abs(token.suspect_since - start) < timedelta(seconds=30)
    assert token.failing_since == token.suspect_since
    assert token.health == TokenHealth.SUSPECT
    assert "登录已过期" in token.last_error
    assert token.last_answered_at is not None  # a real answer about the token
    assert not TokenDeletion.objects.exists()


def test_three_suspect_answers_spanning_over_an_hour_delete_with_reason_suspect(upstream, make_token, time_machine):
    token = make_token()
    alive = [make_token() for _ in range(2)]
    upstream.answers[token.token] = logged_out
    results = runs_at(time_machine, [0, 35, 70])
    assert [r.deleted for r in results] == [0, 0, 1]
    last = results[-1]
    assert (last.status, last.ok, last.invalid, last.failed) == (RunStatus.SUCCEEDED, 2, 1, 0)
    assert not BaomingToken.objects.filter(pk=token.pk).exists()
    audit = TokenDeletion.objects.get(token_pk=token.pk)
    assert audit.reason == DeletionReason.SUSPECT
    assert audit.run_id == last.pk and "登录已过期" in audit.detail
    assert BaomingToken.objects.filter(pk__in=[t.pk for t in alive]).count() == 2


def test_more_answers_within_the_hour_wait_until_the_streak_spans_it(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = logged_out
    results = runs_at(time_machine, [0, 1, 2, 3, 59, 61])
    assert [r.deleted for r in results] == [0, 0, 0, 0, 0, 1]
    assert TokenDeletion.objects.get(token_pk=token.pk).reason == DeletionReason.SUSPECT


def test_a_valid_answer_resets_the_suspect_streak(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = [logged_out, logged_out, ok, logged_out]
    results = runs_at(time_machine, [0, 30, 40, 70])
    assert [r.deleted for r in results] == [0, 0, 0, 0]
    token.refresh_from_db()
    assert (token.suspect_count, token.consecutive_failures) == (1, 1)
    assert abs(token.suspect_since - timezone.now()) < timedelta(seconds=30)  # the new streak
    assert token.failing_since == token.suspect_since


def test_a_valid_answer_clears_every_streak_field(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = [logged_out, ok]
    runs_at(time_machine, [0, 10])
    token.refresh_from_db()
    assert (token.suspect_count, token.suspect_since, token.failing_since) == (0, None, None)
    assert (token.consecutive_failures, token.last_error, token.health) == (0, "", TokenHealth.VALID)


def test_a_transient_failure_neither_counts_nor_breaks_the_streak(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = [logged_out, server_error, logged_out, logged_out]
    start = timezone.now()
    results = runs_at(time_machine, [0, 20, 40, 70])
    token_after_the_500 = TokenCheckRecord.objects.filter(token_pk=token.pk, run=results[1]).get()
    assert token_after_the_500.outcome == "transient"
    assert [r.deleted for r in results] == [0, 0, 0, 1]
    audit = TokenDeletion.objects.get(token_pk=token.pk)
    assert audit.reason == DeletionReason.SUSPECT
    assert audit.deleted_at - start >= timedelta(minutes=70)


def test_a_transient_failure_keeps_the_suspect_count(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = [logged_out, server_error]
    runs_at(time_machine, [0, 20])
    token.refresh_from_db()
    assert (token.suspect_count, token.consecutive_failures, token.last_error) == (1, 2, "HTTP 500")
    assert token.health == TokenHealth.SUSPECT


def test_failing_since_marks_the_first_failure_of_a_streak(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = [server_error, server_error, ok]
    start = timezone.now()
    runs_at(time_machine, [0, 30])
    token.refresh_from_db()
    assert token.health == TokenHealth.FAILING and token.suspect_count == 0
    assert abs(token.failing_since - start) < timedelta(seconds=30)
    runs_at(time_machine, [60])
    token.refresh_from_db()
    assert (token.failing_since, token.health) == (None, TokenHealth.VALID)


def test_invalid_access_token_is_deleted_at_once_not_counted_as_suspect(upstream, make_token):
    token = make_token()
    make_token()
    upstream.answers[token.token] = invalid
    assert run().deleted == 1
    assert TokenDeletion.objects.get(token_pk=token.pk).reason == DeletionReason.INVALID


def test_an_invalid_answer_after_suspect_ones_is_audited_as_invalid(upstream, make_token, time_machine):
    token = make_token()
    make_token()
    upstream.answers[token.token] = [logged_out, logged_out, invalid]
    results = runs_at(time_machine, [0, 35, 70])
    assert [r.deleted for r in results] == [0, 0, 1]
    assert TokenDeletion.objects.get(token_pk=token.pk).reason == DeletionReason.INVALID


def test_an_upstream_saying_logged_out_to_everyone_trips_the_breaker_and_deletes_nothing(
    upstream, make_token, time_machine, caplog
):
    tokens = [make_token() for _ in range(4)]
    for token in tokens:
        upstream.answers[token.token] = logged_out
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        results = runs_at(time_machine, [0, 35, 70])
    last = results[-1]
    assert (last.status, last.breaker_tripped, last.invalid, last.deleted) == (RunStatus.TRIPPED, True, 4, 0)
    assert BaomingToken.objects.count() == 4 and not TokenDeletion.objects.exists()
    assert not BaomingToken.objects.filter(invalid_in_run__isnull=False).exists()
    assert AlertState.objects.get(key="tokens:breaker").active
    breaker_alerts = [r for r in caplog.records if r.name == "leasesite.alerts" and "熔断" in r.getMessage()]
    assert len(breaker_alerts) == 1
    kept = BaomingToken.objects.first()
    assert kept.suspect_count == 3 and kept.consecutive_failures == 3  # counted once, not twice
    assert "circuit breaker" in kept.last_error


def test_the_breaker_counts_invalid_and_suspect_limit_deletions_together(upstream, make_token, time_machine, settings):
    """One token at the suspect limit and one answering invalid, of three: 2 of 3 definitive
    answers would delete (more than half, at least BAOMING_BREAKER_MIN_INVALID): tripped."""
    suspect, dead, _alive = make_token(), make_token(), make_token()
    upstream.answers[suspect.token] = logged_out
    results = runs_at(time_machine, [0, 35], token_ids=[suspect.pk])
    assert [r.deleted for r in results] == [0, 0]
    upstream.answers[dead.token] = invalid
    results = runs_at(time_machine, [70])
    assert (results[0].status, results[0].invalid, results[0].ok, results[0].deleted) == (RunStatus.TRIPPED, 2, 1, 0)
    assert BaomingToken.objects.count() == 3


def test_suspect_messages_are_configurable(upstream, make_token, time_machine, settings):
    settings.BAOMING_SUSPECT_MESSAGES = ["会话结束"]
    ended, expired = make_token(), make_token()
    make_token()
    upstream.answers[ended.token] = json_answer({"sta": -1, "msg": "会话结束"})
    upstream.answers[expired.token] = logged_out
    runs_at(time_machine, [0, 35, 70])
    assert TokenDeletion.objects.get().token_pk == ended.pk
    expired.refresh_from_db()
    assert (expired.suspect_count, expired.consecutive_failures, expired.health) == (0, 3, TokenHealth.FAILING)


def test_the_suspect_limit_is_a_setting(upstream, make_token, time_machine, settings):
    settings.BAOMING_SUSPECT_LIMIT = 5
    token = make_token()
    upstream.answers[token.token] = logged_out
    results = runs_at(time_machine, [0, 35, 70, 80, 90])
    assert [r.deleted for r in results] == [0, 0, 0, 0, 1]


def test_a_dry_run_never_writes_and_reports_what_it_would_delete(upstream, make_token, time_machine):
    token = make_token()
    make_token()
    upstream.answers[token.token] = logged_out
    runs_at(time_machine, [0, 35])
    token.refresh_from_db()
    before = (token.suspect_count, token.suspect_since, token.failing_since, token.last_checked_at)
    checks_before = TokenCheckRecord.objects.count()
    (dry,) = runs_at(time_machine, [70], dry_run=True)
    assert (dry.dry_run, dry.status, dry.deleted, dry.invalid) == (True, RunStatus.SUCCEEDED, 1, 1)
    token.refresh_from_db()
    assert (token.suspect_count, token.suspect_since, token.failing_since, token.last_checked_at) == before
    assert token.invalid_in_run_id is None
    assert not TokenDeletion.objects.exists()
    assert TokenCheckRecord.objects.count() == checks_before  # dry runs keep no history


def test_a_dry_run_on_a_fresh_token_would_delete_nothing(upstream, make_token, time_machine):
    token = make_token()
    upstream.answers[token.token] = logged_out
    (dry,) = runs_at(time_machine, [0], dry_run=True)
    assert (dry.deleted, dry.invalid, dry.failed) == (0, 0, 1)


def test_the_refresh_log_says_suspect(upstream, make_token, caplog):
    token = make_token(card_name="可疑名片")
    upstream.answers[token.token] = logged_out
    with caplog.at_level(logging.INFO, logger="tokens.refresh"):
        run()
    line = next(r.getMessage() for r in caplog.records if "可疑名片" in r.getMessage())
    assert "可疑" in line.split("结果:")[1] and "登录已过期" in line


# --- settings ---------------------------------------------------------------------------------


def django_setup(env: dict[str, str], code: str = "") -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TOKEN_", "BAOMING_"))}
    clean.update({"DJANGO_SETTINGS_MODULE": "leasesite.settings", "LEASESITE_VAR_DIR": "/tmp/leasesite-check"})
    clean.update({"DJANGO_DEBUG": "true", **env})
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup()\n{code}"],
        cwd=BASE,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_probe_settings_default_to_the_old_tools_call():
    code = (
        "from django.conf import settings as s\n"
        "print(repr((s.BAOMING_PROBE_PATH, s.BAOMING_PROBE_EID, s.BAOMING_SUSPECT_MESSAGES,"
        " s.BAOMING_SUSPECT_LIMIT, s.TOKEN_HISTORY_PER_TOKEN)))"
    )
    result = django_setup({}, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(
        ("/xcx/enroll/v3/detail", "69844bcf8eaa2449c7a37fae", ["登录", "过期", "失效", "无效", "token"], 3, 50)
    )


def test_suspect_messages_are_read_comma_separated_and_compared_in_lower_case():
    code = "from django.conf import settings as s\nprint(repr(s.BAOMING_SUSPECT_MESSAGES))"
    result = django_setup({"BAOMING_SUSPECT_MESSAGES": " 会话结束 , Session Ended,,"}, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(["会话结束", "session ended"])


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BAOMING_PROBE_PATH", "xcx/enroll/v3/detail", "must start with /"),
        ("BAOMING_PROBE_PATH", "/xcx/detail?eid=1", "must start with /"),
        ("BAOMING_PROBE_EID", "69844bcf 8eaa", "letters, digits"),
        ("BAOMING_SUSPECT_LIMIT", "1", ">= 2"),
        ("BAOMING_SUSPECT_LIMIT", "three", "must be an integer"),
        ("TOKEN_HISTORY_PER_TOKEN", "0", ">= 1"),
    ],
)
def test_bad_probe_settings_are_refused_at_start_up(name, value, expected):
    result = django_setup({name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and name in result.stderr and expected in result.stderr
