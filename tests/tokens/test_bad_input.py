"""Bad input gets a precise message and changes nothing (issue defect 13, token part)."""

from __future__ import annotations

import json
import logging

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import new_token_value
from tokens.models import BaomingToken, RefreshRun, RunTrigger
from tokens.services.cleanup import token_cleanup_run
from tokens.services.refresh import token_refresh_start
from tokens.tasks import cleanup_tokens, refresh_tokens

pytestmark = pytest.mark.django_db


# --- numbers too big for the code behind them ---------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("cleanup_baoming_tokens", ["--days", "999999"]),
        ("refresh_baoming_tokens", ["--cleanup-days", "999999"]),
        ("refresh_baoming_tokens", ["--max-age-days", "999999"]),
        ("refresh_baoming_tokens", ["--max-age-days", "9" * 5000]),
    ],
)
def test_huge_day_counts_are_refused_by_the_commands(upstream, make_token, command, args):
    make_token()
    with pytest.raises(CommandError, match="must be at most 36500"):
        call_command(command, *args)
    assert not RefreshRun.objects.exists()


def test_a_huge_interval_is_refused(upstream):
    with pytest.raises(CommandError, match="must be at most 8784"):
        call_command("refresh_baoming_tokens", "--scheduler", "--interval", "1e300")


@pytest.mark.parametrize("days", [999_999, 0, -1, "30", 1.5, True, None, 10**400])
def test_cleanup_service_refuses_out_of_range_days(days):
    with pytest.raises(ValueError, match="days must be a whole number between 1 and 36500"):
        token_cleanup_run(days=days, trigger=RunTrigger.BEAT)
    assert not RefreshRun.objects.exists()


@pytest.mark.parametrize("days", [999_999, 0, "7", 7.0, False])
def test_refresh_service_refuses_out_of_range_max_age(upstream, days):
    with pytest.raises(ValueError, match="max_age_days must be a whole number between 1 and 36500"):
        token_refresh_start(trigger=RunTrigger.BEAT, max_age_days=days)
    assert not RefreshRun.objects.exists()


def test_tasks_given_bad_kwargs_log_a_clear_error_instead_of_crashing(upstream, caplog):
    with caplog.at_level(logging.ERROR):
        assert cleanup_tokens(days=999_999) is None
        assert refresh_tokens(max_age_days=999_999) is None
    assert "days must be a whole number between 1 and 36500, got 999999" in caplog.text
    assert "max_age_days must be a whole number between 1 and 36500, got 999999" in caplog.text
    assert not RefreshRun.objects.exists()
    assert "Traceback" not in caplog.text


# --- import: every malformed input is a FILE:LINE message, and nothing is imported ---------------


def import_file(tmp_path, name: str, content: str | bytes, *args: str) -> tuple[str, str, int]:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("import_baoming_tokens", str(path), *args, stdout=out, stderr=err)
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return out.getvalue(), err.getvalue(), code


GOOD = [new_token_value() for _ in range(3)]


@pytest.mark.parametrize(
    ("name", "content", "line", "reason"),
    [
        ("big.csv", f"card_name,user_name,token\n甲,a,{GOOD[0]}\n乙,b,{'x' * 200_000}\n", 3, "longer than"),
        ("nul.csv", f"card_name,user_name,token\n甲,a,{GOOD[0]}\n乙\x00,b,{GOOD[1]}\n", 3, "NUL"),
        (
            "deep.jsonl",
            json.dumps({"card_name": "甲", "token": GOOD[0]}) + "\n" + "[" * 100_000 + "\n",
            2,
            "nested too deeply",
        ),
        (
            "digits.jsonl",
            json.dumps({"card_name": "甲", "token": GOOD[0]}) + '\n{"card_name": "乙", "token": ' + "7" * 5000 + "}\n",
            2,
            "too many digits",
        ),
        ("nul.jsonl", json.dumps({"card_name": "甲\u0000", "token": GOOD[0]}) + "\n", 1, "NUL"),
    ],
)
def test_malformed_import_names_file_and_line_and_imports_nothing(tmp_path, name, content, line, reason):
    _out, err, code = import_file(tmp_path, name, content)
    assert code == 1
    path = tmp_path / name
    matching = [row for row in err.splitlines() if row.startswith(f"{path}:{line}: ")]
    assert matching and reason in matching[0], err
    assert "Traceback" not in err
    assert not BaomingToken.objects.exists()


def test_import_is_all_or_nothing_and_lists_every_bad_row(tmp_path):
    content = "\n".join(
        ["card_name,user_name,token", f"甲,a,{GOOD[0]}", "乙,b,not-a-token", f"丙,c,{GOOD[1]}", "丁,d,e,f,g"]
    )
    out, err, code = import_file(tmp_path, "mixed.csv", content)
    assert code == 1
    path = tmp_path / "mixed.csv"
    assert f"{path}:3: " in err and f"{path}:5: " in err
    assert "imported 0" in out
    assert not BaomingToken.objects.exists()


def test_skip_bad_rows_imports_the_good_ones(tmp_path):
    content = "\n".join(["card_name,user_name,token", f"甲,a,{GOOD[0]}", "乙,b,not-a-token", f"丙,c,{GOOD[1]}"])
    out, err, code = import_file(tmp_path, "mixed.csv", content, "--skip-bad-rows")
    assert code == 1 and f"{tmp_path / 'mixed.csv'}:3: " in err
    assert "imported 2" in out
    assert BaomingToken.objects.count() == 2


def test_duplicates_are_not_errors(tmp_path, make_token):
    make_token(token=GOOD[0])
    content = "\n".join([f"甲,a,{GOOD[0]}", f"乙,b,{GOOD[1]}", f"丙,c,{GOOD[1].upper()}"])
    out, err, code = import_file(tmp_path, "dupes.csv", content)
    assert code == 0, err
    assert "imported 1" in out and "skipped 2 duplicate" in out
    assert BaomingToken.objects.count() == 2
