"""Read-only queries over tokens and runs."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import F, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from tokens.models import BaomingToken, RefreshRun, RunKind, RunStatus


def tokens_last_activity() -> Coalesce:
    """When a token was last known good: ``last_used``, or ``created_at`` if never used."""
    return Coalesce("last_used", "created_at")


def tokens_for_refresh(*, max_age_days: int | None = None) -> QuerySet[BaomingToken]:
    """Tokens a refresh run checks, least recently checked first (never-checked ones first)."""
    queryset = BaomingToken.objects.all()
    if max_age_days is not None:
        cutoff = timezone.now() - timedelta(days=max_age_days)
        queryset = queryset.alias(activity=tokens_last_activity()).filter(activity__gte=cutoff)
    return queryset.order_by(F("last_checked_at").asc(nulls_first=True), "id")


def tokens_stale(*, days: int) -> QuerySet[BaomingToken]:
    """Tokens whose last activity is older than ``days`` days."""
    cutoff = timezone.now() - timedelta(days=days)
    return BaomingToken.objects.alias(activity=tokens_last_activity()).filter(activity__lt=cutoff)


def runs_latest_finished(*, kind: str = RunKind.REFRESH) -> RefreshRun | None:
    return (
        RefreshRun.objects.filter(kind=kind, dry_run=False)
        .exclude(status__in=[RunStatus.RUNNING, RunStatus.FINALIZING])
        .order_by("-started_at", "-id")
        .first()
    )
