"""The circuit breaker holds for runs of any size (issue defect 3) and dry runs report what they
would do without alerting (defect 14)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from leasesite.models import AlertState
from tests.conftest import invalid, server_error
from tokens.models import BaomingToken, RunStatus, TokenDeletion
from tokens.services.refresh import token_refresh_run

pytestmark = pytest.mark.django_db
BASE = Path(__file__).resolve().parents[2]
BREAKER_ALERT_KEY = "tokens:breaker"


def run(**kwargs):
    kwargs.setdefault("trigger", "command")
    return token_refresh_run(**kwargs)


def alerts(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "leasesite.alerts" and r.getMessage().startswith("ALERT")
    ]


def test_three_tokens_all_invalid_trip_the_breaker_and_alert(upstream, make_token, caplog):
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        result = run()
    assert (result.status, result.breaker_tripped, result.invalid, result.deleted) == (RunStatus.TRIPPED, True, 3, 0)
    assert BaomingToken.objects.count() == 3 and not TokenDeletion.objects.exists()
    assert AlertState.objects.get(key=BREAKER_ALERT_KEY).active
    assert len(alerts(caplog)) == 1


def test_one_invalid_of_three_is_still_deleted(upstream, make_token):
    tokens = [make_token() for _ in range(3)]
    upstream.answers[tokens[0].token] = invalid
    result = run()
    assert (result.status, result.deleted) == (RunStatus.SUCCEEDED, 1)
    assert not BaomingToken.objects.filter(pk=tokens[0].pk).exists()


def test_a_single_dead_token_of_a_single_token_run_is_deleted(upstream, make_token):
    token = make_token()
    upstream.answers[token.token] = invalid
    assert run().deleted == 1


def test_max_age_subset_answering_invalid_deletes_nothing(upstream, make_token):
    """The 6-hourly run checks only recently used tokens: a small run, still protected."""
    now = timezone.now()
    for _ in range(30):
        make_token(last_used=now - timedelta(days=20))  # not selected by --max-age-days 7
    recent = [make_token(last_used=now - timedelta(days=1)) for _ in range(5)]
    for token in recent:
        upstream.answers[token.token] = invalid
    result = run(max_age_days=7)
    assert (result.total, result.status, result.deleted) == (5, RunStatus.TRIPPED, 0)
    assert BaomingToken.objects.count() == 35


def test_min_invalid_setting_decides_how_many_invalid_answers_can_trip(upstream, make_token, settings):
    settings.BAOMING_BREAKER_MIN_INVALID = 4
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    assert run().deleted == 3


def test_a_later_untripped_run_resolves_the_breaker_alert(upstream, make_token, caplog):
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    assert run().status == RunStatus.TRIPPED
    upstream.answers.clear()
    with caplog.at_level(logging.INFO, logger="leasesite.alerts"):
        assert run().status == RunStatus.SUCCEEDED
    assert not AlertState.objects.get(key=BREAKER_ALERT_KEY).active
    assert any("Resolved" in m or "已恢复" in m for m in alerts(caplog))


def test_a_dry_run_does_not_resolve_the_breaker_alert(upstream, make_token):
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    run()
    upstream.answers.clear()
    run(dry_run=True)
    assert AlertState.objects.get(key=BREAKER_ALERT_KEY).active


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TOKEN_", "BAOMING_"))}
    clean.update({"DJANGO_SETTINGS_MODULE": "leasesite.settings", "LEASESITE_VAR_DIR": "/tmp/leasesite-check", **env})
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=BASE,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BAOMING_BREAKER_THRESHOLD", "1.5"),
        ("BAOMING_BREAKER_THRESHOLD", "1"),
        ("BAOMING_BREAKER_THRESHOLD", "0"),
        ("BAOMING_BREAKER_THRESHOLD", "nan"),
        ("BAOMING_BREAKER_MIN_INVALID", "0"),
        ("BAOMING_BREAKER_MIN_ANSWERS", "20"),  # replaced: refused rather than silently ignored
    ],
)
def test_bad_breaker_settings_are_refused_at_start_up(name, value):
    result = run_check({name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and name in result.stderr


# --- dry runs (defect 14) -------------------------------------------------------------------------


def test_dry_run_that_would_trip_reports_no_deletion_and_never_alerts(upstream, make_token, caplog):
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    with caplog.at_level(logging.INFO):
        result = run(dry_run=True)
    assert result.dry_run and result.breaker_tripped and result.status == RunStatus.TRIPPED
    assert result.deleted == 0  # what it would delete: nothing, the breaker would trip
    assert alerts(caplog) == []
    assert not AlertState.objects.filter(key=BREAKER_ALERT_KEY).exists()
    assert BaomingToken.objects.count() == 3


def test_dry_run_command_says_the_breaker_would_trip(upstream, make_token, capsys):
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        upstream.answers[token.token] = invalid
    with pytest.raises(CommandError):
        call_command("refresh_baoming_tokens", "--dry-run")
    out = capsys.readouterr().out
    assert "would delete 0" in out and "would trip" in out
    assert "deleted 3" not in out


def test_dry_run_where_every_check_fails_does_not_alert(upstream, make_token, caplog):
    token = make_token()
    upstream.answers[token.token] = server_error
    with caplog.at_level(logging.INFO):
        result = run(dry_run=True)
    assert result.status == RunStatus.FAILED
    assert alerts(caplog) == []
