"""Importing tokens from a file: all or nothing, duplicates skipped by token and by person."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from django.db import IntegrityError, transaction
from django.utils import timezone

from leasesite.crypto import fingerprint_secret, mask_secret
from tokens.models import BaomingToken
from tokens.services.import_formats import (
    FORMAT_CSV,
    FORMAT_LABELS,
    FORMAT_MONGOEXPORT,
    Cards,
    ImportFormatError,
    Row,
    parse_cards_file,
    parse_token_file,
)

_QUERY_CHUNK = 500  # values per IN (...) query: far below every database's parameter limit
_OLDEST = datetime.min.replace(tzinfo=UTC)


@dataclass
class RowOutcome:
    """What happens (or would happen) to one good row."""

    line: int
    key: str | None
    card_name: str
    user_name: str
    masked_token: str
    duplicate_of: str = ""  # empty: imported; else why it is a duplicate

    @property
    def imported(self) -> bool:
        return not self.duplicate_of


@dataclass
class ImportReport:
    format: str = FORMAT_CSV
    rows: int = 0  # rows read from the tokens file, good and bad
    imported: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of the tokens file
    card_errors: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of the --cards file
    outcomes: list[RowOutcome] = field(default_factory=list)  # every good row, in file order
    applied: bool = True  # False: nothing was written (bad rows found, or a dry run)
    dry_run: bool = False
    card_names_from_ids: int = 0  # rows named card_<card id> (no --cards given)
    cards_known: int = 0  # cards read from the --cards file

    @property
    def bad_rows(self) -> int:
        return len(self.errors) + len(self.card_errors)

    @property
    def ok(self) -> bool:
        return not self.bad_rows


def _stored(column: str, values: Iterable[str]) -> dict[str, tuple[int, str]]:
    """{value: (id, card name)} of the stored tokens whose ``column`` is one of ``values``."""
    values = sorted(set(values))
    found: dict[str, tuple[int, str]] = {}
    for start in range(0, len(values), _QUERY_CHUNK):
        chunk = values[start : start + _QUERY_CHUNK]
        rows = BaomingToken.objects.filter(**{f"{column}__in": chunk}).values_list(column, "id", "card_name")
        found.update({value: (pk, card_name) for value, pk, card_name in rows})
    return found


def _where(row: Row) -> str:
    return f"line {row.line}" + (f" ({row.key})" if row.key else "")


def _plan(rows: list[Row]) -> list[tuple[Row, RowOutcome]]:
    """Decide, for every good row, import or duplicate (of a stored token, of a stored person, or of
    another row). Among rows of one token or one person the most recently used is kept."""
    fingerprints = {id(row): fingerprint_secret(row.candidate.token) for row in rows}
    stored_tokens = _stored("fingerprint", fingerprints.values())
    stored_people = _stored("unionid", (row.candidate.unionid for row in rows if row.candidate.unionid))
    # Newest first (stable: rows without times keep file order, so the first one wins).
    newest_first = sorted(rows, key=lambda row: row.candidate.recency or _OLDEST, reverse=True)
    seen_tokens: dict[str, Row] = {}
    seen_people: dict[str, Row] = {}
    planned: list[tuple[Row, RowOutcome]] = []
    for row in newest_first:
        candidate, fingerprint = row.candidate, fingerprints[id(row)]
        unionid = candidate.unionid
        if fingerprint in stored_tokens:
            pk, card_name = stored_tokens[fingerprint]
            reason = f"this token is already stored (token #{pk}, card {card_name})"
        elif unionid and unionid in stored_people:
            pk, card_name = stored_people[unionid]
            reason = f"the same person (unionid) is already stored (token #{pk}, card {card_name})"
        elif fingerprint in seen_tokens:
            reason = f"the same token as {_where(seen_tokens[fingerprint])}"
        elif unionid and unionid in seen_people:
            kept = seen_people[unionid]
            newer = (kept.candidate.recency or _OLDEST) > (candidate.recency or _OLDEST)
            reason = f"the same person (unionid) as {_where(kept)}, " + (
                "which was used more recently" if newer else "which comes first"
            )
        else:
            reason = ""
        seen_tokens.setdefault(fingerprint, row)
        if unionid:
            seen_people.setdefault(unionid, row)
        outcome = RowOutcome(
            line=row.line,
            key=row.key,
            card_name=candidate.card_name,
            user_name=candidate.user_name,
            masked_token=mask_secret(candidate.token),
            duplicate_of=reason,
        )
        planned.append((row, outcome))
    planned.sort(key=lambda pair: pair[0].line)
    return planned


def tokens_import(
    *,
    text: str,
    fmt: str | None = None,
    cards_text: str | None = None,
    skip_bad_rows: bool = False,
    dry_run: bool = False,
    old_tz: tzinfo | None = None,
) -> ImportReport:
    """Import tokens from ``text``: our CSV or JSON lines, or the old tool's JSON store or mongoexport
    (``fmt`` None: detected from the content; ``ImportFormatError`` if it is none of them).

    All or nothing: every row is read and validated first; bad rows are reported with their line
    numbers and, unless ``skip_bad_rows``, nothing at all is imported. Duplicates — a token already
    stored or twice in the file, a person (``unionid``) already stored or twice in the file — are
    skipped and listed, not errors. ``cards_text`` (a mongoexport of the old tool's cards) names the
    cards; ``old_tz`` is the old tool's local time zone (``DJANGO_TIME_ZONE`` when None). A dry run
    decides everything the same way and writes nothing.
    """
    now = timezone.now()
    text = text.removeprefix("\ufeff")  # a byte order mark decoded as text
    cards: Cards | None = parse_cards_file(cards_text.removeprefix("\ufeff")) if cards_text is not None else None
    parsed = parse_token_file(text, fmt=fmt, cards=cards, old_tz=old_tz or timezone.get_default_timezone(), now=now)
    if old_tz is not None and parsed.format != FORMAT_MONGOEXPORT:
        raise ImportFormatError(
            f"the old tool's time zone only applies to mongoexport files; this is {FORMAT_LABELS[parsed.format]}"
        )
    report = ImportReport(
        format=parsed.format,
        rows=len(parsed.rows),
        dry_run=dry_run,
        card_names_from_ids=parsed.card_names_from_ids,
        errors=[(row.line, row.error) for row in parsed.rows if row.candidate is None],
        card_errors=list(cards.errors) if cards is not None else [],
        cards_known=len(cards.names) if cards is not None else 0,
    )
    if report.bad_rows and not skip_bad_rows:
        report.applied = False
        return report
    planned = _plan([row for row in parsed.rows if row.candidate is not None])
    report.outcomes = [outcome for _, outcome in planned]
    if dry_run:
        report.applied = False
    else:
        with transaction.atomic():
            for row, outcome in planned:
                if outcome.imported:
                    _store(row, outcome, now=now)
    report.imported = sum(outcome.imported for outcome in report.outcomes)
    report.duplicates = len(report.outcomes) - report.imported
    return report


def _store(row: Row, outcome: RowOutcome, *, now: datetime) -> None:
    candidate = row.candidate
    try:
        with transaction.atomic():
            BaomingToken.objects.create(
                card_name=candidate.card_name,
                user_name=candidate.user_name,
                token=candidate.token,
                unionid=candidate.unionid,
                avatar_url=candidate.avatar_url,
                created_at=candidate.created_at or now,
                last_used=candidate.last_used,
            )
    except IntegrityError:  # stored meanwhile by someone else (same token or same person)
        outcome.duplicate_of = "stored meanwhile by someone else (same token or same person)"
