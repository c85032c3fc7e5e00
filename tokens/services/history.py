"""Per-token check history: what each run's check of a token said (the console's "recent checks").

Written with one INSERT per batch and trimmed with one DELETE to the newest
``TOKEN_HISTORY_PER_TOKEN`` checks of each token of the batch. Rows are keyed by the token's id,
not a foreign key, so a deleted token's history stays beside its deletion record.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.db.models import F, Window
from django.db.models.functions import RowNumber

from leasesite.log_filters import scrub_secrets
from tokens.clients import CheckResult
from tokens.models import RefreshRun, TokenCheckRecord

MESSAGE_CHARS = 200


def token_history_record(*, run: RefreshRun, checked_at: datetime, checks: Iterable[tuple[int, CheckResult]]) -> int:
    """Store one record per ``(token id, result)`` and drop what falls beyond the bound; returns
    how many were stored. Call it inside the transaction that records the batch."""
    records = [
        TokenCheckRecord(
            token_pk=token_id,
            run=run,
            checked_at=checked_at,
            outcome=str(result.outcome),
            message=scrub_secrets(result.message)[:MESSAGE_CHARS],
            http_status=result.http_status,
        )
        for token_id, result in checks
    ]
    if not records:
        return 0
    # One INSERT for the whole batch on PostgreSQL; SQLite splits it every 166 rows (Django keeps
    # its statements under 999 parameters).
    TokenCheckRecord.objects.bulk_create(records)
    token_history_trim(token_ids=sorted({record.token_pk for record in records}))
    return len(records)


def token_history_trim(*, token_ids: list[int], keep: int | None = None) -> int:
    """Delete the checks of these tokens beyond each one's newest ``keep`` in one query."""
    keep = keep or settings.TOKEN_HISTORY_PER_TOKEN
    ranked = TokenCheckRecord.objects.filter(token_pk__in=token_ids).annotate(
        position=Window(RowNumber(), partition_by=[F("token_pk")], order_by=[F("checked_at").desc(), F("id").desc()])
    )
    deleted, _by_model = TokenCheckRecord.objects.filter(pk__in=ranked.filter(position__gt=keep).values("pk")).delete()
    return deleted
