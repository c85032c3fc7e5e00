"""The files ``import_baoming_tokens`` reads, and how it tells them apart.

Four formats: our own CSV and JSON lines, and the old refresh tool's two stores —
its JSON file ``~/.auto-form-filler/baoming_tokens.json`` (one object keyed ``card_<card id>``) and a
``mongoexport`` of its MongoDB collection ``baoming_tokens`` (extended JSON, canonical or relaxed;
JSON lines, ``--jsonArray`` or ``--pretty``). A ``mongoexport`` of its ``cards`` collection gives card
names.

Everything here is pure: text in, rows out. Each row is either a ``Candidate`` (validated, ready to
store) or an error with its line, so a caller can list every bad row before writing anything.
No message ever contains a token.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator

from leasesite.crypto import mask_secret
from tokens.services.tokens import TokenValidationError
from tokens.services.tokens import _normalize_name as normalize_name
from tokens.services.tokens import _normalize_token as normalize_token

FORMAT_CSV = "csv"
FORMAT_JSONL = "jsonl"
FORMAT_JSON_STORE = "json-store"
FORMAT_MONGOEXPORT = "mongoexport"
FORMATS = (FORMAT_CSV, FORMAT_JSONL, FORMAT_JSON_STORE, FORMAT_MONGOEXPORT)
FORMAT_LABELS = {
    FORMAT_CSV: "CSV",
    FORMAT_JSONL: "JSON lines",
    FORMAT_JSON_STORE: "the old tool's JSON store (baoming_tokens.json)",
    FORMAT_MONGOEXPORT: "a mongoexport of the old tool's baoming_tokens collection",
}
NOT_A_KNOWN_FORMAT = "not a CSV, JSON lines, old JSON store or mongoexport file"

MAX_AVATAR_URL_LENGTH = 500  # BaomingToken.avatar_url
MAX_UNIONID_LENGTH = 100  # BaomingToken.unionid (and the old tool's StringField(max_length=100))
# Times before this are not the old tool's (it was written in 2024): a zeroed or corrupt value.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_TOLERANCE = timedelta(days=1)

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_OBJECT_ID = re.compile(r"[0-9a-fA-F]{24}")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)")
_NUMBER_LONG = re.compile(r"-?\d{1,19}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_URL = URLValidator(schemes=["http", "https"])

# Keys that tell what a JSON record is.
_PLAIN_KEYS = {"card_name", "名片", "token", "user_name", "用户", "用户名"}
_MONGO_KEYS = {"_id", "card"}


class ImportFormatError(ValueError):
    """The file is none of the formats (or not the one asked for); nothing can be read from it."""


@dataclass(frozen=True)
class Candidate:
    """One valid row, ready to store."""

    card_name: str
    user_name: str
    token: str
    unionid: str | None = None
    avatar_url: str = ""
    created_at: datetime | None = None
    last_used: datetime | None = None
    updated_at: datetime | None = None  # the old tool's: only orders duplicates (newest kept)

    @property
    def recency(self) -> datetime | None:
        times = [t for t in (self.created_at, self.last_used, self.updated_at) if t is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class Row:
    """A row of the file: where it is, and either what it holds or why it is bad."""

    line: int
    key: str | None = None  # the JSON store's key (card_<id>)
    candidate: Candidate | None = None
    error: str = ""


@dataclass
class Cards:
    """Card names from a mongoexport of the old tool's ``cards`` collection, by card id."""

    names: dict[str, str]
    errors: list[tuple[int, str]]


@dataclass
class ParsedFile:
    format: str
    rows: list[Row]
    card_names_from_ids: int = 0  # old-tool rows named card_<card id> (no --cards given)


# --- reading JSON with line numbers ---------------------------------------------------------------


class _JsonError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _JsonText:
    """A text holding one or more JSON values, decoded piece by piece so that every value keeps the
    line it starts on (``json.loads`` of the whole text would lose them)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._newlines = [match.start() for match in re.finditer("\n", text)]

    def line_at(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def skip_whitespace(self, pos: int) -> int:
        return _JSON_WHITESPACE.match(self.text, pos).end()

    def decode_at(self, pos: int) -> tuple[object, int]:
        try:
            return _DECODER.raw_decode(self.text, pos)
        except json.JSONDecodeError as exc:
            raise _JsonError(exc.lineno, f"not valid JSON ({exc.msg}, column {exc.colno})") from None
        except RecursionError:
            raise _JsonError(self.line_at(pos), "not valid JSON (nested too deeply)") from None
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            raise _JsonError(self.line_at(pos), "not valid JSON (a number with too many digits)") from None


_REST_NOT_READ = "; the rest of the file was not read"
_NOT_AN_OBJECT = "expected a JSON object"


def _decode_line(raw: str) -> tuple[object, str]:
    if "\x00" in raw:
        return None, "contains a NUL byte"
    try:
        return json.loads(raw), ""
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    except ValueError:  # Python refuses to convert integers of more than 4300 digits
        return None, "not valid JSON (a number with too many digits)"


def _json_lines(text: str) -> Iterator[tuple[int, dict | None, str]]:
    """One JSON object per line; a bad line is reported and the next one read."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which are not lines.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        item, error = _decode_line(raw)
        if error:
            yield line, None, error
        elif not isinstance(item, dict):
            yield line, None, _NOT_AN_OBJECT
        else:
            yield line, item, ""


def _json_array(doc: _JsonText) -> Iterator[tuple[int, dict | None, str]]:
    """A JSON array of objects (``mongoexport --jsonArray``), each element with its line."""
    text = doc.text
    pos = doc.skip_whitespace(0) + 1  # past "["
    pos = doc.skip_whitespace(pos)
    if text.startswith("]", pos):
        pos = doc.skip_whitespace(pos + 1)
    else:
        while True:
            line = doc.line_at(pos)
            try:
                item, pos = doc.decode_at(pos)
            except _JsonError as exc:
                yield exc.line, None, exc.message + _REST_NOT_READ
                return
            yield (line, item, "") if isinstance(item, dict) else (line, None, _NOT_AN_OBJECT)
            pos = doc.skip_whitespace(pos)
            if text.startswith(",", pos):
                pos = doc.skip_whitespace(pos + 1)
                continue
            if text.startswith("]", pos):
                pos = doc.skip_whitespace(pos + 1)
                break
            yield doc.line_at(pos), None, "not valid JSON (expected , or ] after an element)" + _REST_NOT_READ
            return
    if pos < len(text):
        yield doc.line_at(pos), None, "not valid JSON (extra data after the array)" + _REST_NOT_READ


def _json_stream(doc: _JsonText) -> Iterator[tuple[int, dict | None, str]]:
    """JSON objects one after the other, each over several lines (``mongoexport --pretty``)."""
    pos = doc.skip_whitespace(0)
    while pos < len(doc.text):
        line = doc.line_at(pos)
        try:
            item, pos = doc.decode_at(pos)
        except _JsonError as exc:
            yield exc.line, None, exc.message + _REST_NOT_READ
            return
        yield (line, item, "") if isinstance(item, dict) else (line, None, _NOT_AN_OBJECT)
        pos = doc.skip_whitespace(pos)


def _json_object_entries(doc: _JsonText) -> Iterator[tuple[int, str | None, dict | None, str]]:
    """The entries of one JSON object (the old JSON store), each with the line of its key.

    Read entry by entry rather than with ``json.loads``: a key written twice is kept twice (json.load
    keeps only the last), and every entry has a line number.
    """
    text = doc.text
    pos = doc.skip_whitespace(0)
    if not text.startswith("{", pos):
        yield doc.line_at(pos), None, None, _NOT_AN_OBJECT
        return
    pos = doc.skip_whitespace(pos + 1)
    if text.startswith("}", pos):
        pos = doc.skip_whitespace(pos + 1)
    else:
        while True:
            line = doc.line_at(pos)
            if not text.startswith('"', pos):
                yield line, None, None, "not valid JSON (expected a quoted key)" + _REST_NOT_READ
                return
            try:
                key, pos = doc.decode_at(pos)
                pos = doc.skip_whitespace(pos)
                if not text.startswith(":", pos):
                    raise _JsonError(doc.line_at(pos), "not valid JSON (expected : after a key)")
                value, pos = doc.decode_at(doc.skip_whitespace(pos + 1))
            except _JsonError as exc:
                yield exc.line, None, None, exc.message + _REST_NOT_READ
                return
            if isinstance(value, dict):
                yield line, key, value, ""
            else:
                yield line, key, None, "expected an object ({access_token, uname, pic, unionid, _save_time})"
            pos = doc.skip_whitespace(pos)
            if text.startswith(",", pos):
                pos = doc.skip_whitespace(pos + 1)
                continue
            if text.startswith("}", pos):
                pos = doc.skip_whitespace(pos + 1)
                break
            yield doc.line_at(pos), None, None, "not valid JSON (expected , or } after an entry)" + _REST_NOT_READ
            return
    if pos < len(text):
        yield doc.line_at(pos), None, None, "not valid JSON (extra data after the object)" + _REST_NOT_READ


# --- CSV --------------------------------------------------------------------------------------------


def _csv_error_reason(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return f"a field is longer than {csv.field_size_limit()} characters (the CSV field size limit)"
    return f"not valid CSV ({exc})"


def _csv_rows(text: str) -> Iterator[tuple[int, dict | None, str]]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    last_error_line = -1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = reader.line_num
            yield line, None, _csv_error_reason(exc)
            if line == last_error_line:  # the reader cannot get past it: stop rather than loop
                return
            last_error_line = line
            continue
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if any("\x00" in cell for cell in row):
            yield line, None, "contains a NUL byte"
            continue
        cells = [cell.strip() for cell in row]
        if header is None and "token" in [c.lower() for c in cells]:
            header = [c.lower() for c in cells]
            continue
        if header is not None:
            if len(cells) != len(header):
                yield line, None, f"expected {len(header)} columns, got {len(cells)}"
                continue
            yield line, dict(zip(header, cells, strict=True)), ""
        else:
            # No header: card_name,user_name,token (or card_name,token).
            if len(cells) == 3:
                yield line, {"card_name": cells[0], "user_name": cells[1], "token": cells[2]}, ""
            elif len(cells) == 2:
                yield line, {"card_name": cells[0], "user_name": "", "token": cells[1]}, ""
            else:
                yield line, None, f"expected card_name,user_name,token, got {len(cells)} columns"


# --- values -----------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


_TOKEN_LIKE = re.compile(r"[0-9a-fA-F]{32,}")


def _shown(value: object) -> str:
    """A short rendering of a value for a message; anything that could be a token is masked."""
    text = _TOKEN_LIKE.sub(lambda match: mask_secret(match.group()), json.dumps(value, ensure_ascii=False))
    return text if len(text) <= 60 else text[:57] + "..."


def _optional_text(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TokenValidationError(f"{field} must be a string, got {_kind(value)}")
    return value


def _no_nul_bytes(record: dict) -> None:
    if any(isinstance(value, str) and "\x00" in value for value in record.values()):
        raise TokenValidationError("contains a NUL byte")


def _access_token(record: dict) -> str:
    value = record.get("access_token")
    if value is None or value == "":
        raise TokenValidationError("access_token is missing")
    if not isinstance(value, str):
        raise TokenValidationError(f"access_token must be a string, got {_kind(value)}")
    try:
        return normalize_token(value)
    except TokenValidationError:
        raise TokenValidationError("access_token must be 32 hexadecimal characters") from None


def _unionid(record: dict) -> str | None:
    value = _optional_text(record, "unionid").strip()
    if not value:
        return None  # the old tool wrote "" when it had none: not an identity
    if len(value) > MAX_UNIONID_LENGTH:
        raise TokenValidationError(f"unionid is longer than {MAX_UNIONID_LENGTH} characters")
    if any(unicodedata.category(char) in ("Cc", "Zs") for char in value):
        raise TokenValidationError("unionid contains a space or control character")
    return value


def _avatar_url(record: dict) -> str:
    value = _optional_text(record, "pic").strip()
    if not value:
        return ""
    if len(value) > MAX_AVATAR_URL_LENGTH:
        raise TokenValidationError(f"pic is longer than {MAX_AVATAR_URL_LENGTH} characters")
    try:
        _URL(value)
    except ValidationError:
        raise TokenValidationError("pic is not an http(s) URL") from None
    return value


def _checked_time(value: datetime, *, field: str, now: datetime) -> datetime:
    if value < EARLIEST_TIME:
        raise TokenValidationError(f"{field} is before {EARLIEST_TIME.year}: {value:%Y-%m-%d %H:%M:%S %Z}")
    if value > now + FUTURE_TOLERANCE:
        raise TokenValidationError(f"{field} is in the future: {value:%Y-%m-%d %H:%M:%S %Z}")
    return value


def _bson_date(record: dict, field: str, *, old_tz: tzinfo, now: datetime) -> datetime | None:
    """An extended JSON date of the old tool, as the moment it meant.

    The old tool wrote ``datetime.now()`` — naive local time — and MongoDB stores a naive time as if it
    were UTC. So the date's UTC wall-clock reading is the old tool's local time: it is read in
    ``old_tz`` (``--old-time-zone``, default ``DJANGO_TIME_ZONE``).
    """
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"$date"}:
        raise TokenValidationError(f'{field}: expected an extended JSON date {{"$date": ...}}, got {_shown(value)}')
    inner = value["$date"]
    millis: int | None = None
    stored: datetime | None = None
    if isinstance(inner, str) and len(inner) <= 40 and _ISO_DATE.fullmatch(inner):
        try:
            stored = datetime.fromisoformat(inner).astimezone(UTC)
        except (ValueError, OverflowError):
            stored = None
    elif isinstance(inner, dict) and set(inner) == {"$numberLong"}:
        number = inner["$numberLong"]
        if isinstance(number, str) and _NUMBER_LONG.fullmatch(number):
            millis = int(number)
    elif isinstance(inner, int) and not isinstance(inner, bool) and abs(inner) < 10**18:
        millis = inner  # the legacy export format: milliseconds since 1970
    if millis is not None:
        try:
            stored = _EPOCH + timedelta(milliseconds=millis)
        except OverflowError:
            raise TokenValidationError(f"{field}: {_shown(value)} is out of range") from None
    if stored is None:
        raise TokenValidationError(f"{field}: {_shown(value)} is not a date")
    local = stored.replace(tzinfo=None).replace(tzinfo=old_tz)
    return _checked_time(local, field=field, now=now)


def _save_time(record: dict, *, now: datetime) -> datetime | None:
    """The JSON store's ``_save_time``: ``time.time()`` when the old tool saved it (absolute)."""
    value = record.get("_save_time")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenValidationError(f"_save_time: expected seconds since 1970 (a number), got {_shown(value)}")
    try:
        moment = datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise TokenValidationError(f"_save_time: {_shown(value)} is out of range") from None
    return _checked_time(moment, field="_save_time", now=now)


def _object_id(value: object, *, field: str, dbref_allowed: bool = True) -> str:
    """A card reference: ``{"$oid": ...}``, a DBRef ``{"$ref": ..., "$id": ...}`` or a plain id string."""
    if value is None:
        raise TokenValidationError(f"{field} is missing")
    raw: object = value
    if isinstance(value, dict):
        if set(value) == {"$oid"}:
            raw = value["$oid"]
        elif dbref_allowed and "$ref" in value and "$id" in value and set(value) <= {"$ref", "$id", "$db"}:
            return _object_id(value["$id"], field=field, dbref_allowed=False)
        else:
            raise TokenValidationError(
                f'{field}: expected an ObjectId {{"$oid": ...}} or a DBRef {{"$ref": ..., "$id": ...}}, '
                f"got {_shown(value)}"
            )
    if not isinstance(raw, str) or not _OBJECT_ID.fullmatch(raw):
        raise TokenValidationError(f"{field}: {_shown(value)} is not an ObjectId (24 hexadecimal digits)")
    return raw.lower()


# --- records ----------------------------------------------------------------------------------------


def _plain_candidate(item: dict) -> Candidate:
    """A row of our own CSV / JSON lines: card_name (名片), user_name (用户), token (access_token)."""
    card_name = item.get("card_name", item.get("名片", ""))
    user_name = item.get("user_name", item.get("用户", item.get("用户名", "")))
    token = item.get("token", item.get("access_token", ""))
    if not all(isinstance(v, str) for v in (card_name, user_name, token)):
        raise TokenValidationError("card_name, user_name and token must be strings")
    if any("\x00" in v for v in (card_name, user_name, token)):
        raise TokenValidationError("contains a NUL byte")
    return Candidate(
        card_name=normalize_name(card_name, label="card name", required=True),
        user_name=normalize_name(user_name, label="user name", required=False),
        token=normalize_token(token),
    )


def _card_name(card_id: str, cards: Cards | None) -> tuple[str, bool]:
    """(card name, taken from the id?)."""
    if cards is None:
        return normalize_name(f"card_{card_id}", label="card id", required=True), True
    name = cards.names.get(card_id.lower())
    if name is None:
        raise TokenValidationError(f"card {card_id} is not in the --cards file")
    return name, False


def _mongo_candidate(item: dict, *, cards: Cards | None, old_tz: tzinfo, now: datetime) -> tuple[Candidate, bool]:
    _no_nul_bytes(item)
    token = _access_token(item)
    card_name, from_id = _card_name(_object_id(item.get("card"), field="card"), cards)
    candidate = Candidate(
        card_name=card_name,
        user_name=normalize_name(_optional_text(item, "uname"), label="uname", required=False),
        token=token,
        unionid=_unionid(item),
        avatar_url=_avatar_url(item),
        created_at=_bson_date(item, "created_at", old_tz=old_tz, now=now),
        last_used=_bson_date(item, "last_used", old_tz=old_tz, now=now),
        updated_at=_bson_date(item, "updated_at", old_tz=old_tz, now=now),
    )
    return candidate, from_id


def _store_card_id(key: str) -> str:
    """``card_<id>`` (or ``card_<id>_eid_<eid>``, an earlier version keyed by card and event)."""
    if not key.startswith("card_") or len(key) == len("card_"):
        raise TokenValidationError("the key is not card_<card id>")
    card_id = key[len("card_") :].split("_eid_", 1)[0]
    if not card_id:
        raise TokenValidationError("the key is not card_<card id>")
    return card_id


def _store_candidate(key: str, item: dict, *, cards: Cards | None, now: datetime) -> tuple[Candidate, bool]:
    _no_nul_bytes(item)
    if "\x00" in key:
        raise TokenValidationError("the key contains a NUL byte")
    card_id = _store_card_id(key)
    token = _access_token(item)
    card_name, from_id = _card_name(card_id, cards)
    candidate = Candidate(
        card_name=card_name,
        user_name=normalize_name(_optional_text(item, "uname"), label="uname", required=False),
        token=token,
        unionid=_unionid(item),
        avatar_url=_avatar_url(item),
        created_at=_save_time(item, now=now),
    )
    return candidate, from_id


# --- telling the formats apart ------------------------------------------------------------------------


def _flavour(item: dict) -> str | None:
    """What one JSON record is: our own JSON lines, a mongoexport document, or neither."""
    keys = set(item)
    if keys & {"card_name", "名片"}:
        return FORMAT_JSONL
    if keys & _MONGO_KEYS:
        return FORMAT_MONGOEXPORT
    if keys & _PLAIN_KEYS or "access_token" in keys:
        return FORMAT_JSONL
    return None


def _looks_like_store(item: dict) -> bool:
    return not item or any(isinstance(key, str) and key.startswith("card_") for key in item)


def _first_meaningful_line(text: str) -> tuple[int, str]:
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            return number, line
    return 0, ""


def _unknown(reason: str) -> ImportFormatError:
    return ImportFormatError(f"{NOT_A_KNOWN_FORMAT} ({reason})")


def _json_records(text: str) -> list[tuple[int, dict | None, str]]:
    """The objects of a text that starts with ``{`` or ``[``: one array (``--jsonArray``), JSON lines,
    or objects spread over several lines one after the other (``--pretty``).

    Raises ``_JsonError`` when the first object is broken beyond its first line: then nothing tells
    where the next one starts.
    """
    doc = _JsonText(text)
    start = doc.skip_whitespace(0)
    if text.startswith("[", start):
        return list(_json_array(doc))
    try:
        _first, end = doc.decode_at(start)
    except _JsonError as exc:
        if exc.line == doc.line_at(start):  # a broken first line of JSON lines: the next lines still count
            return list(_json_lines(text))
        raise
    if "\n" in text[start:end]:
        return list(_json_stream(doc))
    return list(_json_lines(text))


def detect_format(text: str) -> str:
    """The format of ``text``, from its content; ``ImportFormatError`` when it is none of them."""
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        return FORMAT_CSV  # empty: nothing to import, whatever it was meant to be
    if stripped[0] not in "{[":
        number, line = _first_meaningful_line(text)
        if "," not in line:
            raise _unknown(f"line {number} has no comma and does not start with {{ or [")
        return FORMAT_CSV
    if stripped[0] == "{":
        doc = _JsonText(text)
        try:
            first, _end = doc.decode_at(doc.skip_whitespace(0))
        except _JsonError:
            first = None
        if isinstance(first, dict) and _flavour(first) is None:
            if _looks_like_store(first):
                return FORMAT_JSON_STORE
            raise _unknown("a JSON object whose keys are neither a token record's nor card_<card id>")
    try:
        records = _json_records(text)
    except _JsonError as exc:
        raise _unknown(f"line {exc.line}: {exc.message}") from None
    first_record = next((item for _, item, _ in records if item is not None), None)
    if first_record is None:
        if records and all(error == _NOT_AN_OBJECT for _, _, error in records):
            raise _unknown("JSON values that are not objects")
        return FORMAT_MONGOEXPORT if stripped[0] == "[" else FORMAT_JSONL  # broken records: listed as bad rows
    flavour = _flavour(first_record)
    if flavour is None:
        raise _unknown("its JSON objects have neither card_name and token nor card and access_token")
    return flavour


def parse_token_file(
    text: str, *, fmt: str | None = None, cards: Cards | None = None, old_tz: tzinfo = UTC, now: datetime
) -> ParsedFile:
    """Every row of ``text`` in format ``fmt`` (detected when None), validated."""
    fmt = fmt or detect_format(text)
    if cards is not None and fmt not in (FORMAT_JSON_STORE, FORMAT_MONGOEXPORT):
        raise ImportFormatError(
            f"--cards applies to the old tool's JSON store and mongoexport files, not to {FORMAT_LABELS[fmt]}"
        )
    parsed = ParsedFile(format=fmt, rows=[])
    if fmt == FORMAT_JSON_STORE:
        stripped = text.lstrip(" \t\r\n")
        if not stripped.startswith("{"):
            raise ImportFormatError("not the old tool's JSON store: it is one JSON object keyed card_<card id>")
        for line, key, item, error in _json_object_entries(_JsonText(text)):
            where = f"{key}: " if key is not None else ""
            if item is None:
                parsed.rows.append(Row(line=line, key=key, error=where + error))
                continue
            try:
                candidate, from_id = _store_candidate(key or "", item, cards=cards, now=now)
            except TokenValidationError as exc:
                parsed.rows.append(Row(line=line, key=key, error=where + str(exc)))
                continue
            parsed.card_names_from_ids += from_id
            parsed.rows.append(Row(line=line, key=key, candidate=candidate))
        return parsed
    starts_like_json = text.lstrip(" \t\r\n").startswith(("{", "["))
    if fmt == FORMAT_CSV:
        records = list(_csv_rows(text))
    elif starts_like_json:
        try:
            records = _json_records(text)
        except _JsonError as exc:
            raise ImportFormatError(f"not {FORMAT_LABELS[fmt]} (line {exc.line}: {exc.message})") from None
    elif fmt == FORMAT_JSONL:
        records = list(_json_lines(text))  # every line is reported as not JSON
    elif text.strip():
        raise ImportFormatError(f"not {FORMAT_LABELS[fmt]}: expected JSON objects")
    else:
        records = []
    for line, item, error in records:
        if item is None:
            parsed.rows.append(Row(line=line, error=error))
            continue
        try:
            if fmt == FORMAT_MONGOEXPORT:
                candidate, from_id = _mongo_candidate(item, cards=cards, old_tz=old_tz, now=now)
                parsed.card_names_from_ids += from_id
            else:
                candidate = _plain_candidate(item)
        except TokenValidationError as exc:
            parsed.rows.append(Row(line=line, error=str(exc)))
            continue
        parsed.rows.append(Row(line=line, candidate=candidate))
    return parsed


def parse_cards_file(text: str) -> Cards:
    """Card names by card id, from a mongoexport of the old tool's ``cards`` collection (its ``Card``
    documents: ``_id`` and ``name``, the card's display name). Every problem is an error of its line."""
    stripped = text.lstrip(" \t\r\n")
    if stripped and not stripped.startswith(("{", "[")):
        raise ImportFormatError(
            "not a mongoexport of the old tool's cards collection (expected JSON objects with _id and name)"
        )
    cards = Cards(names={}, errors=[])
    if not stripped:
        return cards
    try:
        records = _json_records(text)
    except _JsonError as exc:
        raise ImportFormatError(
            f"not a mongoexport of the old tool's cards collection (line {exc.line}: {exc.message})"
        ) from None
    first_line: dict[str, int] = {}
    for line, item, error in records:
        if item is None:
            cards.errors.append((line, error))
            continue
        try:
            _no_nul_bytes(item)
            card_id = _object_id(item.get("_id"), field="_id", dbref_allowed=False)
            name = item.get("name")
            if name is None:
                raise TokenValidationError("name is missing")
            if not isinstance(name, str):
                raise TokenValidationError(f"name must be a string, got {_kind(name)}")
            name = normalize_name(name, label="name", required=True)
        except TokenValidationError as exc:
            cards.errors.append((line, str(exc)))
            continue
        if card_id in first_line:
            cards.errors.append((line, f"card {card_id} is also at line {first_line[card_id]}"))
            continue
        first_line[card_id] = line
        cards.names[card_id] = name
    return cards
