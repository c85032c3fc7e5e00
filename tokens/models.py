"""Data of the 报名工具 token keep-alive: tokens, runs, fan-out batches, deletion audit."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from leasesite.crypto import mask_secret
from leasesite.fields import EncryptedTextField, FingerprintField


class RunKind(models.TextChoices):
    REFRESH = "refresh", _("refresh")
    CLEANUP = "cleanup", _("cleanup")


class RunTrigger(models.TextChoices):
    BEAT = "beat", _("beat")
    COMMAND = "command", _("command")
    ADMIN = "admin", _("admin")


class RunStatus(models.TextChoices):
    RUNNING = "running", _("running")
    FINALIZING = "finalizing", _("finalizing")
    SUCCEEDED = "succeeded", _("succeeded")
    TRIPPED = "tripped", _("circuit breaker tripped")
    FAILED = "failed", _("failed")
    ABANDONED = "abandoned", _("abandoned")
    INTERRUPTED = "interrupted", _("interrupted")
    SKIPPED = "skipped", _("skipped")


LIVE_RUN_STATUSES = (RunStatus.RUNNING, RunStatus.FINALIZING)
FINAL_RUN_STATUSES = tuple(status for status in RunStatus if status not in LIVE_RUN_STATUSES)


class RefreshRun(models.Model):
    """One refresh or cleanup run with its statistics (the old tool's statistics block)."""

    kind = models.CharField(_("kind"), max_length=16, choices=RunKind.choices, default=RunKind.REFRESH)
    trigger = models.CharField(_("trigger"), max_length=16, choices=RunTrigger.choices)
    status = models.CharField(
        _("status"), max_length=16, choices=RunStatus.choices, default=RunStatus.RUNNING, db_index=True
    )
    dry_run = models.BooleanField(_("dry run"), default=False)
    max_age_days = models.PositiveIntegerField(_("max age (days)"), null=True, blank=True)
    cleanup_days = models.PositiveIntegerField(_("cleanup after (days)"), null=True, blank=True)
    started_at = models.DateTimeField(_("started at"), default=timezone.now, db_index=True)
    ended_at = models.DateTimeField(_("ended at"), null=True, blank=True)
    duration_seconds = models.FloatField(_("duration (s)"), null=True, blank=True)
    planned = models.PositiveIntegerField(_("selected"), default=0)
    total = models.PositiveIntegerField(_("total"), default=0)
    ok = models.PositiveIntegerField(_("ok"), default=0)
    failed = models.PositiveIntegerField(_("failed"), default=0)
    invalid = models.PositiveIntegerField(_("invalid"), default=0)
    deleted = models.PositiveIntegerField(_("deleted"), default=0)
    rate_limited = models.PositiveIntegerField(_("rate limited"), default=0)
    batch_size = models.PositiveIntegerField(_("batch size"), default=0)
    batches_total = models.PositiveIntegerField(_("batches"), default=0)
    batches_done = models.PositiveIntegerField(_("batches done"), default=0)
    breaker_tripped = models.BooleanField(_("circuit breaker tripped"), default=False)
    # True when the batches go to Celery workers through the broker (the sweeper may send them
    # again); False when one process works them itself (the command).
    dispatched = models.BooleanField(_("dispatched to workers"), default=False)
    # Last sign of life of whoever works the run: a batch claimed, renewed or recorded.
    heartbeat_at = models.DateTimeField(_("last sign of life"), null=True, blank=True)
    lock_owner = models.CharField(_("lock owner"), max_length=64, blank=True)
    error = models.TextField(_("error"), blank=True)

    class Meta:
        verbose_name = _("refresh run")
        verbose_name_plural = _("refresh runs")
        ordering = ["-started_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(batches_done__lte=models.F("batches_total")),
                name="refreshrun_batches_done_lte_total",
            ),
            models.CheckConstraint(
                condition=models.Q(deleted__lte=models.F("total")),
                name="refreshrun_deleted_lte_total",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk} ({self.get_status_display()})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_RUN_STATUSES


class TokenHealth(models.TextChoices):
    VALID = "valid", _("valid")
    FAILING = "failing", _("failing")
    SUSPECT = "suspect", _("suspect (probably logged out)")
    UNCHECKED = "unchecked", _("not checked yet")


class BaomingToken(models.Model):
    """An access token of the 报名工具 mini program. ``token`` is encrypted in the column."""

    card_name = models.CharField(_("card name (名片)"), max_length=100)
    user_name = models.CharField(_("user name"), max_length=100, blank=True)
    token = EncryptedTextField(_("token"))
    fingerprint = FingerprintField(_("fingerprint"), source="token", unique=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, editable=False)
    last_used = models.DateTimeField(_("last used"), null=True, blank=True)
    last_checked_at = models.DateTimeField(_("last checked at"), null=True, blank=True)
    # When the upstream last gave a real answer about this token (valid, invalid, or a JSON
    # business answer) — not a timeout, connection error, 5xx, 429 or garbage. Cleanup deletes
    # only tokens the upstream had this chance to vouch for recently.
    last_answered_at = models.DateTimeField(_("last answered at"), null=True, blank=True, editable=False)
    consecutive_failures = models.PositiveIntegerField(_("consecutive failures"), default=0)
    last_error = models.CharField(_("last error"), max_length=500, blank=True)
    # The current streak of failing answers started then (null while the token answers valid).
    failing_since = models.DateTimeField(_("failing since"), null=True, blank=True, editable=False)
    # "Suspect" answers in a row (DESIGN §3: probably logged out) and when the streak started.
    suspect_count = models.PositiveIntegerField(_("suspect answers in a row"), default=0, editable=False)
    suspect_since = models.DateTimeField(_("suspect since"), null=True, blank=True, editable=False)
    # From a QR login (or the old tool's store): the WeChat identity behind the token. A second
    # login of the same person replaces the token of that row instead of adding one.
    unionid = models.CharField(_("WeChat unionid"), max_length=100, null=True, blank=True, unique=True)
    avatar_url = models.URLField(_("avatar"), max_length=500, blank=True)
    # Set when a run got an "invalid" answer; the run deletes flagged tokens when it ends,
    # unless its circuit breaker tripped.
    invalid_in_run = models.ForeignKey(
        RefreshRun,
        verbose_name=_("answered invalid in run"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )

    class Meta:
        verbose_name = _("报名工具 token")
        verbose_name_plural = _("报名工具 tokens")
        ordering = ["card_name", "id"]
        indexes = [
            models.Index(fields=["last_checked_at", "id"], name="token_check_order_idx"),
            models.Index(fields=["last_used"], name="token_last_used_idx"),
            models.Index(fields=["created_at"], name="token_created_at_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=~models.Q(fingerprint=""), name="token_fingerprint_set"),
            models.CheckConstraint(condition=~models.Q(unionid=""), name="token_unionid_null_or_set"),
            models.CheckConstraint(
                condition=models.Q(suspect_count=0, suspect_since__isnull=True)
                | models.Q(suspect_count__gt=0, suspect_since__isnull=False),
                name="token_suspect_streak_has_a_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.card_name} / {self.user_name or '-'} ({self.masked_token})"

    @property
    def health(self) -> str:
        """valid / failing / suspect / unchecked, for the console (``TokenHealth``)."""
        if self.suspect_count:
            return TokenHealth.SUSPECT
        if self.consecutive_failures:
            return TokenHealth.FAILING
        if self.last_checked_at is None:
            return TokenHealth.UNCHECKED
        return TokenHealth.VALID

    @property
    def masked_token(self) -> str:
        return mask_secret(self.token)


class BatchStatus(models.TextChoices):
    PENDING = "pending", _("pending")
    CLAIMED = "claimed", _("claimed")
    DONE = "done", _("done")


class RefreshBatch(models.Model):
    """A slice of a run's tokens checked by one task; lets a run fan out over many workers."""

    run = models.ForeignKey(RefreshRun, on_delete=models.CASCADE, related_name="batches")
    number = models.PositiveIntegerField()
    token_ids = models.JSONField(default=list)
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.PENDING)
    # A worker claims the batch before calling the upstream and renews the claim while it works;
    # a second delivery finds it claimed and does nothing; an expired claim can be taken again.
    claimed_by = models.CharField(max_length=64, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    # When its message was last sent to the broker, and how many times the sweeper re-sent it.
    dispatched_at = models.DateTimeField(null=True, blank=True)
    redispatches = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = _("refresh batch")
        verbose_name_plural = _("refresh batches")
        constraints = [
            models.UniqueConstraint(fields=["run", "number"], name="refreshbatch_unique_number"),
        ]
        indexes = [models.Index(fields=["run", "status"], name="refreshbatch_run_status_idx")]

    def __str__(self) -> str:
        return f"run {self.run_id} batch {self.number}"


class DeletionReason(models.TextChoices):
    INVALID = "invalid", _("invalid token")
    SUSPECT = "suspect", _("suspect answers over an hour")
    STALE = "stale", _("unused too long")
    ADMIN = "admin", _("deleted by operator")


class TokenDeletion(models.Model):
    """Append-only audit record of a deleted token (never the plaintext)."""

    token_pk = models.BigIntegerField(_("token id"))
    card_name = models.CharField(_("card name (名片)"), max_length=100)
    user_name = models.CharField(_("user name"), max_length=100, blank=True)
    token_masked = models.CharField(_("token (masked)"), max_length=16)
    fingerprint = models.CharField(_("fingerprint"), max_length=64, db_index=True)
    reason = models.CharField(_("reason"), max_length=16, choices=DeletionReason.choices)
    detail = models.CharField(_("detail"), max_length=500, blank=True)
    token_created_at = models.DateTimeField(_("token created at"), null=True)
    token_last_used = models.DateTimeField(_("token last used"), null=True)
    run = models.ForeignKey(
        RefreshRun,
        verbose_name=_("run"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="deletions",
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("actor"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    deleted_at = models.DateTimeField(_("deleted at"), default=timezone.now, editable=False, db_index=True)

    class Meta:
        verbose_name = _("token deletion")
        verbose_name_plural = _("token deletions")
        ordering = ["-deleted_at", "-id"]

    def __str__(self) -> str:
        return f"{self.card_name} ({self.token_masked}) – {self.get_reason_display()}"


class CheckOutcomeChoice(models.TextChoices):
    VALID = "valid", _("valid")
    INVALID = "invalid", _("invalid")
    SUSPECT = "suspect", _("suspect")
    RATE_LIMITED = "rate_limited", _("rate limited")
    TRANSIENT = "transient", _("failed")


class TokenCheckRecord(models.Model):
    """One check of one token in one run: the per-token history the console shows (the last
    ``TOKEN_HISTORY_PER_TOKEN`` per token are kept). Keyed by the token's id, not a foreign key,
    so the history of a deleted token stays readable beside its deletion record."""

    token_pk = models.BigIntegerField(_("token id"), db_index=True)
    run = models.ForeignKey(
        RefreshRun, verbose_name=_("run"), null=True, blank=True, on_delete=models.SET_NULL, related_name="checks"
    )
    checked_at = models.DateTimeField(_("checked at"), default=timezone.now, db_index=True)
    outcome = models.CharField(_("outcome"), max_length=16, choices=CheckOutcomeChoice.choices)
    message = models.CharField(_("message"), max_length=200, blank=True)
    http_status = models.PositiveSmallIntegerField(_("HTTP status"), null=True, blank=True)

    class Meta:
        verbose_name = _("token check")
        verbose_name_plural = _("token checks")
        ordering = ["-checked_at", "-id"]
        indexes = [models.Index(fields=["token_pk", "-checked_at"], name="tokencheck_token_recent_idx")]

    def __str__(self) -> str:
        return f"token {self.token_pk}: {self.outcome}"


class QrLoginStatus(models.TextChoices):
    STARTING = "starting", _("getting a QR code")
    WAITING = "waiting", _("waiting for the scan")
    SUCCEEDED = "succeeded", _("logged in")
    EXPIRED = "expired", _("expired")
    FAILED = "failed", _("failed")
    CANCELLED = "cancelled", _("cancelled")


QR_LOGIN_OPEN_STATUSES = (QrLoginStatus.STARTING, QrLoginStatus.WAITING)


class QrLogin(models.Model):
    """One QR-code login (DESIGN §3): the upstream's QR code to show, and what came of it.

    The login ``code`` lets whoever holds it collect the token, so it is encrypted like a token
    and never shown. Workers poll the upstream and write here; pages poll this row.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    card_name = models.CharField(_("card name (名片)"), max_length=100)
    status = models.CharField(_("status"), max_length=16, choices=QrLoginStatus.choices, default=QrLoginStatus.STARTING)
    qrcode = models.TextField(_("QR code"), blank=True)  # a URL to encode, or a data:image/... picture
    code = EncryptedTextField(_("login code"), blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, editable=False)
    expires_at = models.DateTimeField(_("expires at"))
    polls = models.PositiveIntegerField(_("polls"), default=0)
    message = models.CharField(_("message"), max_length=300, blank=True)
    token = models.ForeignKey(
        BaomingToken, verbose_name=_("token"), null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    replaced = models.BooleanField(_("replaced an existing token"), default=False)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("requested by"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        verbose_name = _("QR login")
        verbose_name_plural = _("QR logins")
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(status=QrLoginStatus.SUCCEEDED) | models.Q(token__isnull=False),
                name="qrlogin_succeeded_has_token",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.card_name} ({self.get_status_display()})"

    @property
    def is_open(self) -> bool:
        return self.status in QR_LOGIN_OPEN_STATUSES
