"""Adding and importing tokens."""

from __future__ import annotations

import csv
import io
import json
import re
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

    @property
    def ok(self) -> bool:
        return not self.errors


def _rows_from_csv(text: str) -> Iterator[tuple[int, dict | None, str]]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
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
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield line, None, f"not valid JSON ({exc.msg})"
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


def tokens_import(*, text: str, fmt: str) -> ImportReport:
    """Import tokens from CSV or JSON lines. Good rows are stored, duplicates skipped, bad rows
    reported with their line numbers. Names accepted: ``card_name``/``名片``, ``user_name``/``用户``,
    ``token``/``access_token``.
    """
    rows: Iterable[tuple[int, dict | None, str]] = (
        _rows_from_json_lines(text) if fmt == "jsonl" else _rows_from_csv(text)
    )
    report = ImportReport()
    for line, item, error in rows:
        if item is None:
            report.errors.append((line, error))
            continue
        card_name = item.get("card_name", item.get("名片", ""))
        user_name = item.get("user_name", item.get("用户", item.get("用户名", "")))
        token = item.get("token", item.get("access_token", ""))
        if not all(isinstance(v, str) for v in (card_name, user_name, token)):
            report.errors.append((line, "card_name, user_name and token must be strings"))
            continue
        try:
            token_add(card_name=card_name, user_name=user_name, token=token)
        except DuplicateTokenError:
            report.duplicates += 1
        except TokenValidationError as exc:
            report.errors.append((line, str(exc)))
        else:
            report.imported += 1
    return report


def tokens_delete_by_operator(*, token_ids: list[int], actor: AbstractBaseUser | None) -> int:
    return tokens_delete(
        queryset=BaomingToken.objects.filter(id__in=token_ids),
        reason=DeletionReason.ADMIN,
        actor=actor,
        detail="deleted in the admin",
    )
