"""Migration from the old refresh tool: its JSON store and a mongoexport of its MongoDB collections.

The fixtures are written here the way the old tool and ``mongoexport`` write them: the JSON store by
``json.dump(all_tokens, f, ensure_ascii=False, indent=2)`` with ``_save_time = time.time()``; the
collection ``baoming_tokens`` (MongoEngine, ``datetime.now()`` — naive local time that MongoDB stores
as if it were UTC) as extended JSON, relaxed (``mongoexport`` default) or canonical
(``--jsonFormat=canonical``), one document per line, ``--jsonArray`` or ``--pretty``.
"""

from __future__ import annotations

import codecs
import io
import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from leasesite.crypto import fingerprint_secret
from tests.conftest import new_token_value
from tokens.models import BaomingToken
from tokens.services.import_formats import ImportFormatError, detect_format
from tokens.services.importing import tokens_import

pytestmark = pytest.mark.django_db
SHANGHAI = ZoneInfo("Asia/Shanghai")
UNIONID = "odVL41Lt9CE5Pn0oKMLbeXGBN0-4"


def oid(n: int) -> str:
    return f"69830fb551c6db84fb{n:06x}"


def relaxed_date(wall_clock: datetime) -> dict:
    """How mongoexport (relaxed, the default) shows a date the old tool stored as ``wall_clock``."""
    return {"$date": wall_clock.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}


def canonical_date(wall_clock: datetime) -> dict:
    millis = int(wall_clock.replace(tzinfo=UTC).timestamp() * 1000)
    return {"$date": {"$numberLong": str(millis)}}


def token_doc(
    n: int,
    *,
    token: str | None = None,
    card: object = None,
    uname: str = "",
    pic: str = "",
    unionid: str = "",
    created: datetime = datetime(2025, 3, 1, 10, 0, 0),
    last_used: datetime | None = datetime(2025, 3, 5, 8, 30, 0),
    canonical: bool = False,
) -> dict:
    date = canonical_date if canonical else relaxed_date
    doc = {
        "_id": {"$oid": f"67a9a0f5e4b0a1b2c3{n:06x}"},
        "card": card if card is not None else {"$oid": oid(n)},
        "access_token": token or new_token_value(),
        "uname": uname or f"用户{n}",
        "pic": pic,
        "unionid": unionid,
        "created_at": date(created),
        "updated_at": date(last_used or created),
    }
    if last_used is not None:
        doc["last_used"] = date(last_used)
    return doc


def card_doc(n: int, name: str) -> dict:
    return {
        "_id": {"$oid": oid(n)},
        "user": {"$oid": "69830fb551c6db84fb000000"},
        "name": name,
        "category": "默认分类",
        "configs": [{"key": "微信", "value": "weixin123", "order": 0}],
        "created_at": relaxed_date(datetime(2025, 1, 1)),
    }


def json_lines(docs: list[dict]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


def store_entry(*, token: str, uname: str = "用户", pic: str = "", unionid: str = "", saved: float) -> dict:
    return {"access_token": token, "uname": uname, "pic": pic, "unionid": unionid, "_save_time": saved}


def store_text(entries: dict[str, dict]) -> str:
    return json.dumps(entries, ensure_ascii=False, indent=2)


def run_import(tmp_path, content: str | bytes, *args: str, name: str = "tokens.jsonl") -> tuple[str, str, int]:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("import_baoming_tokens", str(path), *args, stdout=out, stderr=err)
    except CommandError as exc:
        err.write(f"CommandError: {exc}")
        return out.getvalue(), err.getvalue(), exc.returncode
    return out.getvalue(), err.getvalue(), 0


def write_cards(tmp_path, docs: list[dict] | str) -> str:
    path = tmp_path / "cards.jsonl"
    path.write_text(docs if isinstance(docs, str) else json_lines(docs), encoding="utf-8")
    return str(path)


# --- the JSON store -------------------------------------------------------------------------------


def test_the_json_store_is_detected_and_keeps_uname_unionid_pic_and_save_time(tmp_path):
    first, second = new_token_value(), new_token_value()
    saved = 1739168438.123
    text = store_text(
        {
            f"card_{oid(1)}": store_entry(
                token=first,
                uname="小红",
                pic="https://thirdwx.qlogo.cn/mmopen/vi_32/abc/132",
                unionid=UNIONID,
                saved=saved,
            ),
            # an earlier version of the old tool keyed the store by card and event
            f"card_{oid(2)}_eid_69844bcf8eaa2449c7a37fae": store_entry(token=second, uname="小明", saved=saved + 60),
        }
    )
    out, err, code = run_import(tmp_path, text, name="baoming_tokens.json")
    assert code == 0, err
    assert "the old tool's JSON store (baoming_tokens.json) (detected), 2 row(s)" in out
    assert "card names: card_<card id> for 2 row(s), as no --cards file was given" in out
    assert "imported 2, skipped 0 duplicate(s), 0 bad row(s)" in out
    stored = BaomingToken.objects.get(card_name=f"card_{oid(1)}")
    assert (stored.token, stored.user_name, stored.unionid) == (first, "小红", UNIONID)
    assert stored.avatar_url == "https://thirdwx.qlogo.cn/mmopen/vi_32/abc/132"
    # _save_time is time.time(): an absolute moment, whatever the time zone
    assert stored.created_at == datetime.fromtimestamp(saved, tz=UTC)
    assert stored.last_used is None  # the JSON store never recorded a use
    other = BaomingToken.objects.get(card_name=f"card_{oid(2)}")
    assert (other.token, other.user_name, other.unionid, other.avatar_url) == (second, "小明", None, "")
    assert first not in out + err and second not in out + err


def test_the_json_store_takes_card_names_from_cards(tmp_path):
    token = new_token_value()
    cards = write_cards(tmp_path, [card_doc(1, "名片1"), card_doc(2, "名片2")])
    text = store_text({f"card_{oid(2)}": store_entry(token=token, saved=1739168438.0)})
    out, err, code = run_import(tmp_path, text, "--cards", cards, name="baoming_tokens.json")
    assert code == 0, err
    assert "card names: from" in out and "(2 card(s))" in out
    assert BaomingToken.objects.get().card_name == "名片2"


def test_an_empty_json_store_imports_nothing_and_says_so(tmp_path):
    out, err, code = run_import(tmp_path, "{}\n", name="baoming_tokens.json")
    assert code == 0, err
    assert "JSON store" in out and "imported 0" in out


# --- mongoexport ------------------------------------------------------------------------------------


def test_mongoexport_relaxed_and_canonical_dates_objectids_and_dbrefs(tmp_path):
    tokens = [new_token_value() for _ in range(3)]
    docs = [
        token_doc(1, token=tokens[0], unionid=UNIONID, pic="https://thirdwx.qlogo.cn/a/132"),
        token_doc(2, token=tokens[1], canonical=True),
        # a DBRef card reference (ReferenceField(dbref=True)) and no last_used
        token_doc(3, token=tokens[2], card={"$ref": "cards", "$id": {"$oid": oid(3)}}, last_used=None),
    ]
    out, err, code = run_import(tmp_path, json_lines(docs))
    assert code == 0, err
    assert "a mongoexport of the old tool's baoming_tokens collection (detected), 3 row(s)" in out
    first = BaomingToken.objects.get(card_name=f"card_{oid(1)}")
    assert (first.token, first.user_name, first.unionid) == (tokens[0], "用户1", UNIONID)
    assert first.avatar_url == "https://thirdwx.qlogo.cn/a/132"
    # The old tool's naive local times, read in DJANGO_TIME_ZONE (Asia/Shanghai in the tests).
    assert first.created_at == datetime(2025, 3, 1, 10, 0, tzinfo=SHANGHAI)
    assert first.last_used == datetime(2025, 3, 5, 8, 30, tzinfo=SHANGHAI)
    second = BaomingToken.objects.get(card_name=f"card_{oid(2)}")
    assert (second.created_at, second.last_used) == (
        datetime(2025, 3, 1, 10, 0, tzinfo=SHANGHAI),
        datetime(2025, 3, 5, 8, 30, tzinfo=SHANGHAI),
    )
    third = BaomingToken.objects.get(card_name=f"card_{oid(3)}")
    assert third.token == tokens[2] and third.last_used is None


def test_old_time_zone_says_where_the_old_tool_ran(tmp_path):
    _out, err, code = run_import(tmp_path, json_lines([token_doc(1)]), "--old-time-zone", "UTC")
    assert code == 0, err
    assert BaomingToken.objects.get().created_at == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)


def test_legacy_export_with_integer_dates_and_offsets(tmp_path):
    doc = token_doc(1)
    doc["created_at"] = {"$date": int(datetime(2025, 3, 1, 10, 0, tzinfo=UTC).timestamp() * 1000)}
    doc["last_used"] = {"$date": "2025-03-05T16:30:00.000+0800"}  # mongoexport 2.x: a local rendering
    _out, err, code = run_import(tmp_path, json_lines([doc]))
    assert code == 0, err
    stored = BaomingToken.objects.get()
    assert stored.created_at == datetime(2025, 3, 1, 10, 0, tzinfo=SHANGHAI)
    assert stored.last_used == datetime(2025, 3, 5, 8, 30, tzinfo=SHANGHAI)


def test_mongoexport_json_array_pretty_or_not(tmp_path):
    docs = [token_doc(1), token_doc(2, canonical=True)]
    out, err, code = run_import(tmp_path, json.dumps(docs, ensure_ascii=False, indent=2), name="array.json")
    assert code == 0, err
    assert "mongoexport" in out and "imported 2" in out
    one_line = json.dumps([token_doc(3), token_doc(4)], ensure_ascii=False)
    out, err, code = run_import(tmp_path, one_line, name="array1.json")
    assert code == 0, err
    assert BaomingToken.objects.count() == 4


def test_mongoexport_pretty_documents_one_after_the_other(tmp_path):
    docs = [token_doc(1), token_doc(2)]
    text = "\n".join(json.dumps(doc, ensure_ascii=False, indent=4) for doc in docs) + "\n"
    out, err, code = run_import(tmp_path, text)
    assert code == 0, err
    assert "mongoexport" in out and "imported 2" in out


def test_a_bad_element_of_a_json_array_is_named_by_its_line(tmp_path):
    docs = [token_doc(1), token_doc(2, token="not-a-token"), token_doc(3)]
    text = json.dumps(docs, ensure_ascii=False, indent=2)
    bad_line = text.splitlines().index("  {", 2) + 1  # the second element starts on its own line
    _out, err, code = run_import(tmp_path, text, name="array.json")
    assert code == 1
    assert f"array.json:{bad_line}: access_token must be 32 hexadecimal characters" in err
    assert not BaomingToken.objects.exists()


def test_mongoexport_with_cards_takes_names_and_refuses_unknown_cards(tmp_path):
    cards = write_cards(tmp_path, [card_doc(1, "名片1"), card_doc(2, "名片2")])
    docs = [token_doc(1), token_doc(2, card={"$ref": "cards", "$id": {"$oid": oid(2)}}), token_doc(9)]
    out, err, code = run_import(tmp_path, json_lines(docs), "--cards", cards)
    assert code == 1
    assert f"tokens.jsonl:3: card {oid(9)} is not in the --cards file" in err
    assert "nothing was imported" in err
    assert not BaomingToken.objects.exists()
    out, err, code = run_import(tmp_path, json_lines(docs), "--cards", cards, "--skip-bad-rows")
    assert code == 1 and "imported 2" in out
    assert sorted(BaomingToken.objects.values_list("card_name", flat=True)) == ["名片1", "名片2"]


def test_a_bad_cards_file_is_listed_line_by_line_and_nothing_is_imported(tmp_path):
    cards = write_cards(
        tmp_path,
        "\n".join(
            [
                json.dumps(card_doc(1, "名片1"), ensure_ascii=False),
                json.dumps({"_id": {"$oid": oid(2)}}),
                json.dumps({"_id": {"$oid": "nope"}, "name": "x"}),
                json.dumps(card_doc(1, "again"), ensure_ascii=False),
                "{broken",
                json.dumps(card_doc(5, "名\u0000片")),
            ]
        ),
    )
    _out, err, code = run_import(tmp_path, json_lines([token_doc(1)]), "--cards", cards)
    assert code == 1
    for line, reason in [
        (2, "name is missing"),
        (3, "_id:"),
        (4, f"card {oid(1)} is also at line 1"),
        (5, "not valid JSON"),
        (6, "NUL"),
    ]:
        matching = [row for row in err.splitlines() if row.startswith(f"{cards}:{line}: ")]
        assert matching and reason in matching[0], err
    assert not BaomingToken.objects.exists()


def test_cards_only_applies_to_the_old_tools_files(tmp_path):
    cards = write_cards(tmp_path, [card_doc(1, "名片1")])
    _out, err, code = run_import(tmp_path, f"甲,a,{new_token_value()}\n", "--cards", cards, name="t.csv")
    assert code == 1 and "--cards applies to the old tool's JSON store and mongoexport files, not to CSV" in err
    assert not BaomingToken.objects.exists()


def test_a_cards_file_that_is_not_a_mongoexport_is_refused(tmp_path):
    cards = tmp_path / "cards.csv"
    cards.write_text("id,name\n1,x\n", encoding="utf-8")
    _out, err, code = run_import(tmp_path, json_lines([token_doc(1)]), "--cards", str(cards))
    assert code == 1 and "not a mongoexport of the old tool's cards collection" in err


# --- duplicates ----------------------------------------------------------------------------------------


def test_duplicates_by_token_and_by_person_in_the_database_and_in_the_file(tmp_path):
    stored_token = BaomingToken.objects.create(card_name="已有", token=new_token_value())
    stored_person = BaomingToken.objects.create(card_name="本人", token=new_token_value(), unionid="u-stored")
    repeated, fresh = new_token_value(), new_token_value()
    old_login, new_login = new_token_value(), new_token_value()
    docs = [
        token_doc(1, token=stored_token.token),  # line 1: this token is stored
        token_doc(2, unionid="u-stored"),  # line 2: this person is stored
        token_doc(3, token=repeated, last_used=datetime(2025, 3, 1, 12, 0)),  # line 3: kept (first, same time)
        token_doc(4, token=repeated, last_used=datetime(2025, 3, 1, 12, 0)),  # line 4: same token as line 3
        token_doc(5, token=old_login, unionid="u-twice", last_used=datetime(2025, 2, 1, 9, 0)),  # older login
        token_doc(6, token=new_login, unionid="u-twice", last_used=datetime(2025, 3, 9, 9, 0)),  # newer: kept
        token_doc(7, token=fresh),
    ]
    out, err, code = run_import(tmp_path, json_lines(docs))
    assert code == 0, err
    assert "imported 3, skipped 4 duplicate(s), 0 bad row(s)" in out
    path = str(tmp_path / "tokens.jsonl")
    rows = [row.removeprefix(path + ":") for row in out.splitlines() if row.startswith(path + ":")]
    lines = {int(row.split(":")[0]): row for row in rows if row.split(":")[0].isdigit()}
    assert f"this token is already stored (token #{stored_token.pk}, card 已有)" in lines[1]
    assert f"the same person (unionid) is already stored (token #{stored_person.pk}, card 本人)" in lines[2]
    assert "the same token as line 3" in lines[4]
    assert "the same person (unionid) as line 6, which was used more recently" in lines[5]
    assert {3, 6, 7}.isdisjoint(lines)  # imported rows are listed with -v 2 or --dry-run only
    assert set(BaomingToken.objects.values_list("token", flat=True)) == {
        stored_token.token,
        stored_person.token,
        repeated,
        new_login,
        fresh,
    }
    assert BaomingToken.objects.get(fingerprint=fingerprint_secret(new_login)).unionid == "u-twice"
    for token in (stored_token.token, repeated, old_login, new_login, fresh):
        assert token not in out + err


def test_duplicates_in_the_json_store_by_unionid_keep_the_latest_save(tmp_path):
    older, newer = new_token_value(), new_token_value()
    text = store_text(
        {
            f"card_{oid(1)}_eid_a": store_entry(token=older, unionid=UNIONID, saved=1739000000.0),
            f"card_{oid(1)}_eid_b": store_entry(token=newer, unionid=UNIONID, saved=1739100000.0),
        }
    )
    out, err, code = run_import(tmp_path, text, name="baoming_tokens.json")
    assert code == 0, err
    assert "imported 1, skipped 1 duplicate(s)" in out
    assert f"card_{oid(1)}_eid_a: duplicate, skipped: the same person (unionid) as line 9 (card_{oid(1)}_eid_b)" in out
    assert BaomingToken.objects.get().token == newer


def test_importing_the_same_file_twice_skips_everything_the_second_time(tmp_path):
    text = json_lines([token_doc(1, unionid="a"), token_doc(2)])
    assert run_import(tmp_path, text)[2] == 0
    out, _err, code = run_import(tmp_path, text)
    assert code == 0 and "imported 0, skipped 2 duplicate(s)" in out
    assert BaomingToken.objects.count() == 2


# --- dry run -------------------------------------------------------------------------------------------


def test_dry_run_reports_every_row_and_writes_nothing(tmp_path):
    existing = BaomingToken.objects.create(card_name="已有", token=new_token_value())
    docs = [token_doc(1), token_doc(2, token=existing.token), token_doc(3, token="bad")]
    out, err, code = run_import(tmp_path, json_lines(docs), "--dry-run", "--skip-bad-rows")
    assert code == 1  # like the real run: a bad row
    path = tmp_path / "tokens.jsonl"
    assert f"{path}:1: would import: card card_{oid(1)} | user 用户1 | token " in out
    assert f"{path}:2: duplicate, would skip: this token is already stored (token #{existing.pk}" in out
    assert f"{path}:3: access_token must be 32 hexadecimal characters" in err
    assert "dry run, nothing written: would import 1, would skip 1 duplicate(s), 1 bad row(s)" in out
    assert list(BaomingToken.objects.values_list("pk", flat=True)) == [existing.pk]

    out, err, code = run_import(tmp_path, json_lines(docs[:2]), "--dry-run")
    assert code == 0, err
    assert "would import 1, would skip 1" in out
    assert BaomingToken.objects.count() == 1
    out, err, code = run_import(tmp_path, json_lines(docs[:2]))
    assert code == 0 and "imported 1, skipped 1" in out  # the real run does what the dry run said
    assert BaomingToken.objects.count() == 2


def test_dry_run_with_bad_rows_says_nothing_would_be_imported(tmp_path):
    out, err, code = run_import(tmp_path, json_lines([token_doc(1), token_doc(2, token="bad")]), "--dry-run")
    assert code == 1
    assert "nothing would be imported" in err and "dry run, nothing written" in out
    assert not BaomingToken.objects.exists()


# --- bad input: a precise message, and nothing is lost --------------------------------------------------


def with_field(n: int, **changes: object) -> dict:
    doc = token_doc(n)
    for name, value in changes.items():
        if value is _REMOVE:
            doc.pop(name)
        else:
            doc[name] = value
    return doc


_REMOVE = object()
FUTURE = datetime.now() + timedelta(days=30)


@pytest.mark.parametrize(
    ("bad_doc", "reason"),
    [
        (with_field(2, access_token=_REMOVE), "access_token is missing"),
        (with_field(2, access_token=None), "access_token is missing"),
        (with_field(2, access_token="9a8b" * 7), "access_token must be 32 hexadecimal characters"),
        (with_field(2, access_token=["a"]), "access_token must be a string, got a list"),
        (with_field(2, access_token="f" * 200_000), "access_token must be 32 hexadecimal characters"),
        (with_field(2, uname="名" * 200_000), "uname is longer than 100 characters"),
        (with_field(2, uname="a\u0000b"), "contains a NUL byte"),
        (with_field(2, uname={"$numberInt": "1"}), "uname must be a string, got an object"),
        (with_field(2, pic="x" * 600), "pic is longer than 500 characters"),
        (with_field(2, pic="javascript:alert(1)"), "pic is not an http(s) URL"),
        (with_field(2, unionid=12), "unionid must be a string, got a number"),
        (with_field(2, unionid="u" * 101), "unionid is longer than 100 characters"),
        (with_field(2, created_at={"$date": "not a date"}), 'created_at: {"$date": "not a date"} is not a date'),
        (with_field(2, created_at={"$date": "2025-13-45T00:00:00Z"}), "is not a date"),
        (with_field(2, created_at={"$date": {"$numberLong": "soon"}}), "is not a date"),
        (with_field(2, created_at="2025-03-01T10:00:00Z"), 'created_at: expected an extended JSON date {"$date": ...}'),
        (with_field(2, last_used={"$date": {"$numberLong": "9" * 19}}), "last_used: "),
        (with_field(2, last_used=relaxed_date(FUTURE)), "last_used is in the future"),
        (with_field(2, created_at={"$date": "1970-01-01T00:00:00Z"}), "created_at is before 2000"),
        (with_field(2, card=_REMOVE), "card is missing"),
        (with_field(2, card={"$oid": "xyz"}), 'card: {"$oid": "xyz"} is not an ObjectId'),
        (with_field(2, card={"$ref": "cards", "$id": {"$ref": "x", "$id": oid(1)}}), "expected an ObjectId"),
        (with_field(2, card=["a"]), "is not an ObjectId"),
    ],
)
def test_a_bad_document_is_named_by_its_line_and_nothing_is_imported(tmp_path, bad_doc, reason):
    text = json_lines([token_doc(1), bad_doc, token_doc(3)])
    out, err, code = run_import(tmp_path, text)
    assert code == 1
    matching = [row for row in err.splitlines() if row.startswith(f"{tmp_path / 'tokens.jsonl'}:2: ")]
    assert matching and reason in matching[0], err
    assert "Traceback" not in err and "imported 0" in out
    assert not BaomingToken.objects.exists()
    assert len(err) < 2_000  # a huge field is never echoed back


def test_a_bad_access_token_is_never_echoed(tmp_path):
    secretish = new_token_value() + "z"
    _out, err, code = run_import(tmp_path, json_lines([with_field(1, access_token=secretish)]))
    assert code == 1 and "access_token must be 32 hexadecimal characters" in err
    assert secretish not in err and secretish[:32] not in err


def test_a_token_in_the_wrong_field_is_masked_in_the_message(tmp_path):
    token = new_token_value()
    _out, err, code = run_import(tmp_path, json_lines([with_field(1, card={"$oid": token})]))
    assert code == 1 and "is not an ObjectId" in err
    assert token not in err and f"{token[:4]}…{token[-4:]}" in err


@pytest.mark.parametrize(
    ("raw_line", "reason"),
    [
        ('{"card": {"$oid": "' + "a" * 24 + '"}, "access_token": "x\x00"}', "NUL"),
        ("[" * 100_000, "nested too deeply"),
        ('{"card": 1' + "7" * 5000 + "}", "too many digits"),
        ("\ufeff" + json.dumps(token_doc(9)), "BOM"),  # a second file pasted after the first
        ('{"card": {"$oid": "' + "a" * 24 + '"}', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_broken_lines_of_a_mongoexport_are_named_by_their_line(tmp_path, raw_line, reason):
    text = json.dumps(token_doc(1), ensure_ascii=False) + "\n" + raw_line + "\n" + json.dumps(token_doc(3)) + "\n"
    _out, err, code = run_import(tmp_path, text)
    assert code == 1
    matching = [row for row in err.splitlines() if row.startswith(f"{tmp_path / 'tokens.jsonl'}:2: ")]
    assert matching and reason in matching[0], err
    assert not BaomingToken.objects.exists()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"uname": "x", "_save_time": 1739168438.0}, "access_token is missing"),
        ({"access_token": "nope", "_save_time": 1739168438.0}, "access_token must be 32 hexadecimal characters"),
        ({"access_token": new_token_value(), "_save_time": "yesterday"}, "_save_time: expected seconds since 1970"),
        ({"access_token": new_token_value(), "_save_time": 1e300}, "_save_time: 1e+300 is out of range"),
        ({"access_token": new_token_value(), "_save_time": 0}, "_save_time is before 2000"),
        ({"access_token": new_token_value(), "uname": "\u0000"}, "contains a NUL byte"),
        ("just a string", "expected an object"),
    ],
)
def test_a_bad_entry_of_the_json_store_is_named_by_its_line_and_key(tmp_path, entry, reason):
    good = store_entry(token=new_token_value(), saved=1739168438.0)
    text = store_text({f"card_{oid(1)}": good, f"card_{oid(2)}": entry})
    bad_line = next(n for n, line in enumerate(text.splitlines(), 1) if f"card_{oid(2)}" in line)
    _out, err, code = run_import(tmp_path, text, name="baoming_tokens.json")
    assert code == 1
    prefix = f"{tmp_path / 'baoming_tokens.json'}:{bad_line}: card_{oid(2)}: "
    matching = [row for row in err.splitlines() if row.startswith(prefix)]
    assert matching and reason in matching[0], err
    assert not BaomingToken.objects.exists()


def test_json_store_nan_and_keys_that_are_not_cards(tmp_path):
    text = (
        "{\n"
        f'  "card_{oid(1)}": {{"access_token": "{new_token_value()}", "_save_time": NaN}},\n'
        f'  "settings": {{"access_token": "{new_token_value()}"}}\n'
        "}\n"
    )
    _out, err, code = run_import(tmp_path, text, name="baoming_tokens.json")
    assert code == 1
    assert f":2: card_{oid(1)}: _save_time: expected seconds since 1970 (a number), got NaN" in err
    assert ":3: settings: the key is not card_<card id>" in err


def test_a_broken_json_store_is_refused_with_the_line_of_the_problem(tmp_path):
    text = store_text({f"card_{oid(n)}": store_entry(token=new_token_value(), saved=1739168438.0) for n in (1, 2)})
    broken = text.replace('"uname": "用户",', '"uname": "用户"', 1)  # a missing comma on line 4
    _out, err, code = run_import(tmp_path, broken, name="baoming_tokens.json")
    assert code == 1
    assert "not a CSV, JSON lines, old JSON store or mongoexport file (line 5: not valid JSON" in err
    assert not BaomingToken.objects.exists()


def test_skip_bad_rows_imports_the_good_documents(tmp_path):
    docs = [token_doc(1), with_field(2, created_at={"$date": "not a date"}), token_doc(3)]
    out, err, code = run_import(tmp_path, json_lines(docs), "--skip-bad-rows")
    assert code == 1 and "imported 2, skipped 0 duplicate(s), 1 bad row(s)" in out
    assert "were not imported" in err
    assert BaomingToken.objects.count() == 2


# --- encodings and byte order marks ----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    text = json_lines([token_doc(1), token_doc(2)])
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    out, err, code = run_import(tmp_path, data)
    assert code == 0, err
    assert "mongoexport" in out and "imported 2" in out


def test_a_bom_before_the_json_store_is_fine(tmp_path):
    text = store_text({f"card_{oid(1)}": store_entry(token=new_token_value(), saved=1739168438.0)})
    out, err, code = run_import(tmp_path, codecs.BOM_UTF8 + text.encode(), name="baoming_tokens.json")
    assert code == 0, err
    assert "JSON store" in out and "imported 1" in out


def test_a_file_in_another_encoding_is_refused_with_its_line(tmp_path):
    data = f"card_name,user_name,token\n甲,a,{new_token_value()}\n".encode("gbk")
    _out, err, code = run_import(tmp_path, data, name="t.csv")
    assert code == 1 and "t.csv:2: not UTF-8 text (save the file as UTF-8)" in err


# --- telling the formats apart --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card_name,user_name,token\n甲,a,9a8bb3f233aa4de4b3209b47d5ac0efe\n", "csv"),
        ("甲,9a8bb3f233aa4de4b3209b47d5ac0efe\n", "csv"),
        ('{"card_name": "甲", "token": "9a8bb3f233aa4de4b3209b47d5ac0efe"}\n', "jsonl"),
        ('{"名片": "甲", "access_token": "9a8bb3f233aa4de4b3209b47d5ac0efe"}\n{"card_name": "乙"}\n', "jsonl"),
        (
            store_text({f"card_{oid(1)}": store_entry(token="9a8bb3f233aa4de4b3209b47d5ac0efe", saved=1.0)}),
            "json-store",
        ),
        (json.dumps({f"card_{oid(1)}": {"access_token": "x"}}), "json-store"),
        (json_lines([token_doc(1)]), "mongoexport"),
        (json.dumps([token_doc(1)]), "mongoexport"),
        (json.dumps(token_doc(1), indent=2), "mongoexport"),
        ("{broken\n" + json.dumps(token_doc(1)) + "\n", "mongoexport"),
        ("[]", "mongoexport"),  # an empty collection exported with --jsonArray
        ("", "csv"),
    ],
)
def test_the_format_is_detected_from_the_content(text, expected):
    assert detect_format(text) == expected


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("hello world\nthis is a letter\n", "line 1 has no comma"),
        ("9a8bb3f233aa4de4b3209b47d5ac0efe\n1b8bb3f233aa4de4b3209b47d5ac0efe\n", "line 1 has no comma"),
        ('{"settings": {"theme": "dark"}}\n', "a JSON object whose keys are neither a token record's nor card_"),
        ('{"a": 1}\n{"b": 2}\n', "a JSON object whose keys are neither a token record's nor card_<card id>"),
        ('[{"a": 1}, {"b": 2}]', "its JSON objects have neither card_name and token nor card and access_token"),
        ("[[1, 2], [3]]", "JSON values that are not objects"),
        ("42\n", "line 1 has no comma"),
        ('{\n  "card_x": {\n    "access_token": "a"\n  ,,\n}', "line 4: not valid JSON"),
    ],
)
def test_a_file_that_is_none_of_the_formats_is_refused_clearly(tmp_path, content, why):
    _out, err, code = run_import(tmp_path, content, name="mystery.txt")
    assert code == 1
    assert f"mystery.txt: not a CSV, JSON lines, old JSON store or mongoexport file ({why}" in err, err
    assert "9a8bb3f233aa4de4b3209b47d5ac0efe" not in err
    assert "Traceback" not in err
    assert not BaomingToken.objects.exists()


def test_binary_files_are_refused(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
    _out, err, code = run_import(tmp_path, png, name="picture.png")
    assert code == 1 and "picture.png:1: not UTF-8 text" in err


def test_our_own_records_pretty_printed_or_in_an_array_are_read(tmp_path):
    first, second = new_token_value(), new_token_value()
    records = [{"card_name": "甲", "user_name": "a", "token": first}, {"名片": "乙", "access_token": second}]
    pretty = "\n".join(json.dumps(record, ensure_ascii=False, indent=2) for record in records)
    out, err, code = run_import(tmp_path, pretty, name="pretty.json")
    assert code == 0, err
    assert "JSON lines (detected), 2 row(s)" in out and "imported 2" in out
    BaomingToken.objects.all().delete()
    out, err, code = run_import(tmp_path, json.dumps(records, ensure_ascii=False), name="array.json")
    assert code == 0, err
    assert sorted(BaomingToken.objects.values_list("card_name", flat=True)) == ["乙", "甲"]


def test_the_service_reads_text_that_still_starts_with_a_bom():
    report = tokens_import(text="\ufeff" + json_lines([token_doc(1)]))
    assert (report.format, report.imported) == ("mongoexport", 1)


def test_format_can_be_forced(tmp_path):
    _out, err, code = run_import(tmp_path, "a,b,c\n", "--format", "json-store", name="t.csv")
    assert code == 1 and "not the old tool's JSON store" in err
    _out, err, code = run_import(tmp_path, "a,b,c\n", "--format", "mongoexport", name="t.csv")
    assert code == 1 and "not a mongoexport of the old tool's baoming_tokens collection: expected JSON objects" in err
    out, err, code = run_import(tmp_path, json_lines([token_doc(1)]), "--format", "mongoexport")
    assert code == 0 and "(as --format says)" in out


def test_old_time_zone_is_checked(tmp_path):
    text = store_text({f"card_{oid(1)}": store_entry(token=new_token_value(), saved=1739168438.0)})
    _out, err, code = run_import(tmp_path, text, "--old-time-zone", "UTC", name="baoming_tokens.json")
    assert code == 1 and "time zone only applies to mongoexport files" in err
    assert not BaomingToken.objects.exists()


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "x" * 500, ""])
def test_an_unknown_old_time_zone_is_a_bad_flag(tmp_path, zone):
    path = tmp_path / "t.jsonl"
    path.write_text(json_lines([token_doc(1)]), encoding="utf-8")
    with pytest.raises(CommandError, match="unknown time zone"):
        call_command("import_baoming_tokens", str(path), "--old-time-zone", zone)
    assert not BaomingToken.objects.exists()


def test_the_service_refuses_a_file_of_no_known_format():
    with pytest.raises(ImportFormatError, match="not a CSV, JSON lines, old JSON store or mongoexport file"):
        tokens_import(text="just words\n")
