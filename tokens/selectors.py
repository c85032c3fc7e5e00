"""Read-only queries over tokens and runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import F, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from leasesite.crypto import fingerprint_secret
from leasesite.locks import lock_holder
from tokens.models import (
    LIVE_RUN_STATUSES,
    BaomingToken,
    RefreshRun,
    RunKind,
    RunStatus,
    TokenCheckRecord,
    TokenDeletion,
    TokenHealth,
)
from tokens.services.runs import REFRESH_LOCK_NAME


def tokens_last_activity() -> Coalesce:
    """When a token was last known good: ``last_used``, or ``created_at`` if never used."""
    return Coalesce("last_used", "created_at")


def token_by_plaintext(*, token: str) -> BaomingToken | None:
    """The stored row of a plaintext token, found through its fingerprint (never decrypting all)."""
    return BaomingToken.objects.filter(fingerprint=fingerprint_secret(token)).first()


def tokens_for_refresh(*, max_age_days: int | None = None) -> QuerySet[BaomingToken]:
    """Tokens a refresh run checks, least recently checked first (never-checked ones first)."""
    queryset = BaomingToken.objects.all()
    if max_age_days is not None:
        cutoff = timezone.now() - timedelta(days=max_age_days)
        queryset = queryset.alias(activity=tokens_last_activity()).filter(activity__gte=cutoff)
    return queryset.order_by(F("last_checked_at").asc(nulls_first=True), "id")


def tokens_stale(*, days: int) -> QuerySet[BaomingToken]:
    """Tokens cleanup may delete: last activity older than ``days`` days, **and** the upstream gave
    a real answer about them within those days (``last_answered_at``) without vouching for them.

    A token the upstream could not be asked about (outage, timeouts) is never stale: our failure
    to reach the upstream is no evidence against it.
    """
    cutoff = timezone.now() - timedelta(days=days)
    return BaomingToken.objects.alias(activity=tokens_last_activity()).filter(
        activity__lt=cutoff, last_answered_at__gte=cutoff
    )


def refresh_run_latest_evidence() -> RefreshRun | None:
    """The latest finished (non-dry) refresh run that tells how the upstream is doing.

    A run that succeeded with nothing to check (an empty ``--max-age-days`` subset) says nothing
    about the upstream, so it does not hide the failed run before it.
    """
    return (
        RefreshRun.objects.filter(kind=RunKind.REFRESH, dry_run=False)
        .exclude(status__in=LIVE_RUN_STATUSES)
        .exclude(status=RunStatus.SUCCEEDED, total=0)
        .order_by("-started_at", "-id")
        .first()
    )


def runs_latest_finished(*, kind: str = RunKind.REFRESH) -> RefreshRun | None:
    return (
        RefreshRun.objects.filter(kind=kind, dry_run=False)
        .exclude(status__in=[RunStatus.RUNNING, RunStatus.FINALIZING])
        .order_by("-started_at", "-id")
        .first()
    )


def tokens_with_health(queryset: QuerySet[BaomingToken], health: str) -> QuerySet[BaomingToken]:
    """The tokens of ``queryset`` whose ``BaomingToken.health`` is ``health`` (same rules, in SQL)."""
    if health == TokenHealth.SUSPECT:
        return queryset.filter(suspect_count__gt=0)
    healthy_streaks = queryset.filter(suspect_count=0)
    if health == TokenHealth.FAILING:
        return healthy_streaks.filter(consecutive_failures__gt=0)
    if health == TokenHealth.UNCHECKED:
        return healthy_streaks.filter(consecutive_failures=0, last_checked_at__isnull=True)
    if health == TokenHealth.VALID:
        return healthy_streaks.filter(consecutive_failures=0, last_checked_at__isnull=False)
    return queryset


def token_recent_checks(*, token_pk: int, limit: int | None = None) -> list[TokenCheckRecord]:
    """A token's newest checks first (also of a deleted token: history is keyed by its id)."""
    limit = limit or settings.TOKEN_HISTORY_PER_TOKEN
    fields = ("id", "token_pk", "run_id", "checked_at", "outcome", "message", "http_status")
    return list(TokenCheckRecord.objects.filter(token_pk=token_pk).order_by("-checked_at", "-id").only(*fields)[:limit])


def refresh_run_holding_lock() -> RefreshRun | None:
    """The live refresh run that holds the refresh lock now, if the lock is held by one."""
    holder = lock_holder(name=REFRESH_LOCK_NAME)
    if holder is None or not holder.owner:
        return None
    return (
        RefreshRun.objects.filter(kind=RunKind.REFRESH, lock_owner=holder.owner, status__in=LIVE_RUN_STATUSES)
        .order_by("-id")
        .first()
    )


def _bounded(rows: list, *, limit: int, count: QuerySet) -> tuple[list, int]:
    """``rows`` (at most ``limit`` of ``count``) and the size of ``count``, counted only when needed."""
    return rows, (count.count() if len(rows) >= limit else len(rows))


def run_deletions(*, run_id: int, limit: int) -> tuple[list[TokenDeletion], int]:
    """The first ``limit`` audit records of the tokens a run deleted, and how many there are."""
    queryset = TokenDeletion.objects.filter(run_id=run_id)
    fields = ("id", "token_pk", "card_name", "user_name", "token_masked", "reason", "detail", "deleted_at")
    rows = list(queryset.order_by("deleted_at", "id").only(*fields)[:limit])
    return _bounded(rows, limit=limit, count=queryset)


@dataclass(frozen=True)
class RunTokenResult:
    """One per-token check of a run, with the token (only its names) while it is still stored,
    else the audit record of its deletion (if any)."""

    check: TokenCheckRecord
    token: BaomingToken | None
    deletion: TokenDeletion | None


def run_token_results(*, run_id: int, limit: int) -> tuple[list[RunTokenResult], int]:
    """The first ``limit`` stored per-token checks of a run in check order, and how many the run
    has stored (history is trimmed per token, so an old run may keep fewer than it made).

    At most four queries whatever the size of the run; never loads a token's value.
    """
    queryset = TokenCheckRecord.objects.filter(run_id=run_id)
    fields = ("id", "token_pk", "run_id", "checked_at", "outcome", "message", "http_status")
    checks = list(queryset.order_by("checked_at", "id").only(*fields)[:limit])
    token_ids = {check.token_pk for check in checks}
    tokens: dict[int, BaomingToken] = {}
    deletions: dict[int, TokenDeletion] = {}
    if token_ids:
        tokens = {t.pk: t for t in BaomingToken.objects.filter(pk__in=token_ids).only("id", "card_name", "user_name")}
        missing = token_ids - tokens.keys()
        if missing:
            for deletion in (
                TokenDeletion.objects.filter(token_pk__in=missing)
                .order_by("deleted_at", "id")
                .only("id", "token_pk", "card_name", "user_name")
            ):
                deletions[deletion.token_pk] = deletion  # the latest one wins
    results = [RunTokenResult(check, tokens.get(check.token_pk), deletions.get(check.token_pk)) for check in checks]
    return _bounded(results, limit=limit, count=queryset)
