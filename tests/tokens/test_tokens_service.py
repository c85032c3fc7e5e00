from __future__ import annotations

import json

import pytest

from tokens.models import BaomingToken
from tokens.services.importing import tokens_import
from tokens.services.tokens import DuplicateTokenError, TokenValidationError, token_add

pytestmark = pytest.mark.django_db
TOKEN = "9a8bb3f233aa4de4b3209b47d5ac0efe"


def test_add_normalises_and_refuses_duplicates():
    stored = token_add(card_name=" 张三 ", user_name="zhang", token=f"  {TOKEN.upper()}\n")
    assert (stored.card_name, stored.token) == ("张三", TOKEN)
    with pytest.raises(DuplicateTokenError):
        token_add(card_name="other", token=TOKEN)
    assert BaomingToken.objects.count() == 1


@pytest.mark.parametrize("bad", ["", "xyz", TOKEN[:-1], TOKEN + "0", "g" * 32])
def test_add_rejects_malformed_tokens_without_echoing_them(bad):
    with pytest.raises(TokenValidationError) as excinfo:
        token_add(card_name="x", token=bad)
    assert not bad or bad not in str(excinfo.value)


def test_add_requires_card_name():
    with pytest.raises(TokenValidationError, match="card name"):
        token_add(card_name="  ", token=TOKEN)


def test_import_csv_reports_bad_rows_and_skips_duplicates():
    token_add(card_name="existing", token=TOKEN)
    text = "\n".join(
        [
            "card_name,user_name,token",
            f"甲,a,{'1' * 32}",
            "乙,b,not-a-token",
            f"丙,c,{TOKEN}",
            "丁,d",
            f",e,{'2' * 32}",
            f"戊,e,{'3' * 32}",
        ]
    )
    refused = tokens_import(text=text, fmt="csv")
    assert (refused.applied, refused.imported) == (False, 0)
    assert [line for line, _ in refused.errors] == [3, 5, 6]
    assert BaomingToken.objects.count() == 1  # all or nothing by default
    report = tokens_import(text=text, fmt="csv", skip_bad_rows=True)
    assert (report.imported, report.duplicates) == (2, 1)
    assert [line for line, _ in report.errors] == [3, 5, 6]
    assert BaomingToken.objects.count() == 3


def test_import_headerless_csv():
    report = tokens_import(text=f"甲,a,{'1' * 32}\n乙,{'2' * 32}\n", fmt="csv")
    assert report.imported == 2 and report.ok


def test_import_json_lines():
    lines = [
        json.dumps({"card_name": "甲", "user_name": "a", "token": "4" * 32}),
        "{broken",
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"名片": "乙", "access_token": "5" * 32}),
        json.dumps({"card_name": "丙", "token": 123}),
    ]
    report = tokens_import(text="\n".join(lines), fmt="jsonl", skip_bad_rows=True)
    assert report.imported == 2
    assert [line for line, _ in report.errors] == [2, 3, 6]
