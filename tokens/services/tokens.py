"""Adding and importing tokens."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from leasesite.crypto import fingerprint_secret
from tokens.models import BaomingToken, DeletionReason
from tokens.services.deletion import tokens_delete

TOKEN_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_LENGTH = 100


class TokenValidationError(ValueError):
    """A token or its metadata is not acceptable (the message never contains the token)."""


class DuplicateTokenError(TokenValidationError):
    """The same token is already stored."""


def _normalize_token(raw: str) -> str:
    token = (raw or "").strip().lower()
    if not TOKEN_PATTERN.fullmatch(token):
        raise TokenValidationError("token must be 32 hexadecimal characters")
    return token


def _normalize_name(raw: str | None, *, label: str, required: bool) -> str:
    value = (raw or "").strip()
    if required and not value:
        raise TokenValidationError(f"{label} is required")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise TokenValidationError(f"{label} contains a control character")
    if len(value) > MAX_NAME_LENGTH:
        raise TokenValidationError(f"{label} is longer than {MAX_NAME_LENGTH} characters")
    return value


def token_add(*, card_name: str, user_name: str = "", token: str) -> BaomingToken:
    """Store one token (validated, encrypted). Raises ``DuplicateTokenError`` if already stored."""
    card_name = _normalize_name(card_name, label="card name", required=True)
    user_name = _normalize_name(user_name, label="user name", required=False)
    token = _normalize_token(token)
    if BaomingToken.objects.filter(fingerprint=fingerprint_secret(token)).exists():
        raise DuplicateTokenError("this token is already stored")
    try:
        with transaction.atomic():
            return BaomingToken.objects.create(card_name=card_name, user_name=user_name, token=token)
    except IntegrityError:
        raise DuplicateTokenError("this token is already stored") from None


@dataclass
class ImportReport:
    imported: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    applied: bool = True  # False: bad rows were found and nothing was written

    @property
    def ok(self) -> bool:
        return not self.errors


def _csv_error_reason(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return f"a field is longer than {csv.field_size_limit()} characters (the CSV field size limit)"
    return f"not valid CSV ({exc})"


def _rows_from_csv(text: str) -> Iterator[tuple[int, dict | None, str]]:
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


def _rows_from_json_lines(text: str) -> Iterator[tuple[int, dict | None, str]]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which are not lines.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield line, None, f"not valid JSON ({exc.msg})"
            continue
        except RecursionError:
            yield line, None, "not valid JSON (nested too deeply)"
            continue
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            yield line, None, "not valid JSON (a number with too many digits)"
            continue
        if not isinstance(item, dict):
            yield line, None, "expected a JSON object"
            continue
        yield line, item, ""


def detect_format(text: str, filename: str = "") -> str:
    if filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if filename.lower().endswith(".csv"):
        return "csv"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "csv"


def _validated_row(item: dict) -> tuple[str, str, str]:
    card_name = item.get("card_name", item.get("名片", ""))
    user_name = item.get("user_name", item.get("用户", item.get("用户名", "")))
    token = item.get("token", item.get("access_token", ""))
    if not all(isinstance(v, str) for v in (card_name, user_name, token)):
        raise TokenValidationError("card_name, user_name and token must be strings")
    if any("\x00" in v for v in (card_name, user_name, token)):
        raise TokenValidationError("contains a NUL byte")
    return (
        _normalize_name(card_name, label="card name", required=True),
        _normalize_name(user_name, label="user name", required=False),
        _normalize_token(token),
    )


def tokens_import(*, text: str, fmt: str, skip_bad_rows: bool = False) -> ImportReport:
    """Import tokens from CSV or JSON lines, all or nothing.

    Every row is read and validated first; bad rows are reported with their line numbers and,
    unless ``skip_bad_rows``, nothing at all is imported. Duplicates (of a stored token or of an
    earlier row) are skipped and counted, not errors. Names accepted: ``card_name``/``名片``,
    ``user_name``/``用户``, ``token``/``access_token``.
    """
    rows: Iterable[tuple[int, dict | None, str]] = (
        _rows_from_json_lines(text) if fmt == "jsonl" else _rows_from_csv(text)
    )
    report = ImportReport()
    good: list[tuple[str, str, str]] = []
    for line, item, error in rows:
        if item is None:
            report.errors.append((line, error))
            continue
        try:
            good.append(_validated_row(item))
        except TokenValidationError as exc:
            report.errors.append((line, str(exc)))
    if report.errors and not skip_bad_rows:
        report.applied = False
        return report
    fingerprints = [fingerprint_secret(token) for _, _, token in good]
    stored: set[str] = set()
    for start in range(0, len(fingerprints), 500):
        chunk = fingerprints[start : start + 500]
        stored.update(BaomingToken.objects.filter(fingerprint__in=chunk).values_list("fingerprint", flat=True))
    with transaction.atomic():
        for (card_name, user_name, token), fingerprint in zip(good, fingerprints, strict=True):
            if fingerprint in stored:
                report.duplicates += 1
                continue
            stored.add(fingerprint)
            try:
                with transaction.atomic():
                    BaomingToken.objects.create(card_name=card_name, user_name=user_name, token=token)
            except IntegrityError:  # stored meanwhile by someone else
                report.duplicates += 1
                continue
            report.imported += 1
    return report


def tokens_delete_by_operator(*, token_ids: list[int], actor: AbstractBaseUser | None) -> int:
    return tokens_delete(
        queryset=BaomingToken.objects.filter(id__in=token_ids),
        reason=DeletionReason.ADMIN,
        actor=actor,
        detail="deleted in the admin",
    )
