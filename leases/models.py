"""Data of the seat-lease engine: teams, leases, their event log and redemption codes (DESIGN §5).

Models hold fields, choices, constraints and the allowed-transitions table. Every status change
goes through ``leases.services.transitions`` (the only writer of ``MemberLease.status``).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import ProtectedError
from django.db.models.functions import Lower, Upper
from django.db.models.signals import pre_delete
from django.dispatch import receiver
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from leases.providers import PROVIDER_CHOICES
from leasesite.crypto import mask_secret
from leasesite.fields import EncryptedTextField


class LeaseStatus(models.TextChoices):
    WAITING = "waiting", _("waiting for a seat")
    PENDING = "pending", _("pending (invited)")
    ACTIVE = "active", _("active")
    TRANSFERRING = "transferring", _("transferring")
    FAILED = "failed", _("failed (needs a human)")
    CANCELLED = "cancelled", _("cancelled")
    EXPIRED = "expired", _("expired")


class LeaseAction(models.TextChoices):
    REDEEMED = "redeemed", _("redeemed")
    INVITED = "invited", _("invited")
    INVITE_FAILED = "invite_failed", _("invite failed")
    REINVITED = "reinvited", _("re-invited")
    JOINED = "joined", _("joined")
    MEMBER_SEEN = "member_seen", _("member id learnt")
    TRANSFER_STARTED = "transfer_started", _("transfer started")
    TARGET_CHOSEN = "target_chosen", _("target team chosen")
    LEFT_OLD_TEAM = "left_old_team", _("left old team")
    TRANSFERRED = "transferred", _("transferred")
    TRANSFER_RETRY = "transfer_retry", _("transfer retry scheduled")
    TRANSFER_FAILED = "transfer_failed", _("transfer failed")
    EXPIRED = "expired", _("expired")
    CANCEL_REQUESTED = "cancel_requested", _("cancel requested")
    CANCELLED = "cancelled", _("cancelled")
    SEAT_NOT_FREED = "seat_not_freed", _("seat not freed at the provider")
    RESET = "reset", _("reset by operator")
    RETRY = "retry", _("retry by operator")
    EDITED = "edited", _("edited by operator")
    IMPORTED = "imported", _("imported from the old system")
    NOTE = "note", _("note")
    WAITING = "waiting", _("queued for a seat")
    SEATED = "seated", _("seat found (left the waiting list)")
    RENEWED = "renewed", _("renewed")
    REMINDED = "reminded", _("reminded")


FINAL_STATUSES = frozenset({LeaseStatus.CANCELLED, LeaseStatus.EXPIRED})
NON_FINAL_STATUSES = tuple(s for s in LeaseStatus if s not in FINAL_STATUSES)
# A lease in one of these holds a seat in ``team`` (a pending invite counts as a used seat; a
# failed lease may still be seated, so it keeps its seat until an operator decides). A waiting
# lease has no team and holds nothing.
SEAT_HOLDING_STATUSES = tuple(s for s in NON_FINAL_STATUSES if s != LeaseStatus.WAITING)
# A transferring lease also holds (reserves) a seat in its ``transfer_team``. ``Team.seats_taken``
# counts both; ``leases.selectors.seat_counts_of`` is that rule for one lease.

# The state machine (DESIGN §5). Anything not listed is refused by the transition function.
# pending -> transferring: a pending lease of a dead team is evacuated to a healthy team.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    # waiting -> pending: a seat freed, the lease is seated in a team and invited.
    LeaseStatus.WAITING: frozenset({LeaseStatus.PENDING, LeaseStatus.CANCELLED}),
    LeaseStatus.PENDING: frozenset({LeaseStatus.ACTIVE, LeaseStatus.TRANSFERRING, LeaseStatus.CANCELLED}),
    LeaseStatus.ACTIVE: frozenset(
        {LeaseStatus.TRANSFERRING, LeaseStatus.EXPIRED, LeaseStatus.CANCELLED, LeaseStatus.FAILED}
    ),
    # transferring -> expired: the entitlement ended, the member was removed from the team.
    LeaseStatus.TRANSFERRING: frozenset(
        {LeaseStatus.PENDING, LeaseStatus.EXPIRED, LeaseStatus.FAILED, LeaseStatus.CANCELLED}
    ),
    LeaseStatus.FAILED: frozenset({LeaseStatus.ACTIVE, LeaseStatus.TRANSFERRING, LeaseStatus.CANCELLED}),
    LeaseStatus.CANCELLED: frozenset(),
    LeaseStatus.EXPIRED: frozenset(),
}


# Steps: actions that write a lease's workflow fields without changing its status. The
# transition function refuses a step its status does not list, like a transition the table above
# does not list.
_OPEN_STEPS = frozenset(
    {LeaseAction.NOTE, LeaseAction.EDITED, LeaseAction.CANCEL_REQUESTED, LeaseAction.RENEWED, LeaseAction.REMINDED}
)
STEP_ACTIONS: dict[str, frozenset[str]] = {
    LeaseStatus.WAITING: _OPEN_STEPS,
    LeaseStatus.PENDING: _OPEN_STEPS
    | {LeaseAction.INVITED, LeaseAction.INVITE_FAILED, LeaseAction.REINVITED, LeaseAction.SEAT_NOT_FREED},
    LeaseStatus.ACTIVE: _OPEN_STEPS | {LeaseAction.MEMBER_SEEN},
    LeaseStatus.TRANSFERRING: _OPEN_STEPS
    | {
        LeaseAction.TARGET_CHOSEN,
        LeaseAction.INVITED,
        LeaseAction.LEFT_OLD_TEAM,
        LeaseAction.TRANSFER_RETRY,
        LeaseAction.SEAT_NOT_FREED,
    },
    LeaseStatus.FAILED: _OPEN_STEPS | {LeaseAction.SEAT_NOT_FREED},
    # After a cancel or an expiry the seat is freed at the provider and recorded.
    LeaseStatus.CANCELLED: frozenset({LeaseAction.NOTE, LeaseAction.LEFT_OLD_TEAM, LeaseAction.SEAT_NOT_FREED}),
    LeaseStatus.EXPIRED: frozenset({LeaseAction.NOTE}),
}


class TeamHealth(models.TextChoices):
    """DESIGN §4: a dead team takes no redemptions and no transfers in; its leases are evacuated."""

    HEALTHY = "healthy", _("healthy")
    DEGRADED = "degraded", _("degraded (listings failing)")
    DEAD = "dead", _("dead (credentials revoked or workspace deactivated)")


class TransferStep(models.TextChoices):
    """How far the current transfer got; written in the same transaction as its event."""

    NONE = "", _("not started")
    INVITED = "invited", _("invited to the next team")


class Team(models.Model):
    """A team whose seats we lease, reached through a provider (DESIGN §4)."""

    name = models.CharField(_("name"), max_length=100, unique=True)
    provider = models.CharField(_("provider"), max_length=32, choices=PROVIDER_CHOICES, default="http")
    api_base = models.URLField(_("API base URL"), max_length=500, blank=True)
    api_token = EncryptedTextField(_("API token"), blank=True)
    capacity = models.PositiveIntegerField(_("capacity (seats)"))
    is_active = models.BooleanField(_("active"), default=True)
    expires_at = models.DateTimeField(_("team expires at"), null=True, blank=True)
    # Redemptions, transfers and evacuations stay inside one pool.
    pool = models.CharField(_("pool"), max_length=50, default="default", db_index=True)
    health = models.CharField(_("health"), max_length=16, choices=TeamHealth.choices, default=TeamHealth.HEALTHY)
    health_changed_at = models.DateTimeField(_("health changed at"), null=True, blank=True)
    health_reason = models.CharField(_("health reason"), max_length=500, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, editable=False)
    # What the last successful join sync saw at the provider (seats used by people we do not
    # lease count too).
    last_synced_at = models.DateTimeField(_("last synced at"), null=True, blank=True)
    members_seen = models.PositiveIntegerField(_("members at last sync"), null=True, blank=True)
    invites_seen = models.PositiveIntegerField(_("invites at last sync"), null=True, blank=True)
    last_sync_error = models.TextField(_("last sync error"), blank=True)
    # Seats our leases hold here (``SEAT_HOLDING_STATUSES`` with this team, plus transfers on
    # their way in: ``transferring`` with this ``transfer_team``). Kept by the lease transition
    # function in the same transaction as the status/team change, and only there: every take is
    # a conditional UPDATE that re-checks the room on the locked row (``leases.services.transitions``).
    seats_taken = models.PositiveIntegerField(_("seats taken by our leases"), default=0, editable=False)

    class Meta:
        verbose_name = _("team")
        verbose_name_plural = _("teams")
        ordering = ["name"]
        permissions = [("can_manage_team_health", _("Can mark teams dead or healthy"))]
        constraints = [
            models.CheckConstraint(condition=models.Q(capacity__gte=1), name="team_capacity_positive"),
            models.CheckConstraint(
                condition=models.Q(health__in=[h.value for h in TeamHealth]), name="team_health_known"
            ),
            models.CheckConstraint(condition=~models.Q(pool=""), name="team_pool_set"),
            # No upper bound in the database: a capacity lowered below the seats taken, or an
            # import of members already seated, is a real state (the team takes nobody until it
            # is back under its capacity). No new seat is ever taken over capacity: the take's
            # UPDATE says ``seats_taken < capacity`` in its WHERE.
            models.CheckConstraint(condition=models.Q(seats_taken__gte=0), name="team_seats_taken_not_negative"),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Saving a loaded team (an operator's edit, a set-up) never writes ``seats_taken``: the
        value in memory may be stale, and the counter has one writer (the transition function)."""
        if not self._state.adding and kwargs.get("update_fields") is None:
            kwargs["update_fields"] = [
                f.name for f in self._meta.concrete_fields if not f.primary_key and f.name != "seats_taken"
            ]
        super().save(*args, **kwargs)

    @property
    def is_dead(self) -> bool:
        return self.health == TeamHealth.DEAD

    @property
    def masked_api_token(self) -> str:
        return mask_secret(self.api_token)


class MemberLease(models.Model):
    """One customer's seat, moving from team to team until its entitlement ends."""

    public_id = models.UUIDField(_("public id"), default=uuid.uuid4, unique=True, editable=False)
    email = models.EmailField(_("email"), max_length=254)
    # Null only while waiting for a seat (DESIGN §5).
    team = models.ForeignKey(
        Team, on_delete=models.PROTECT, null=True, blank=True, related_name="leases", verbose_name=_("team")
    )
    # The pool of the code it was redeemed with: its teams, transfers and place in the queue.
    pool = models.CharField(_("pool"), max_length=50, default="default", db_index=True)
    term_months = models.PositiveSmallIntegerField(_("term (months)"))
    total_months = models.PositiveSmallIntegerField(_("entitlement (months)"), null=True, blank=True)
    created_at = models.DateTimeField(_("redeemed at"), default=timezone.now, editable=False)
    invited_at = models.DateTimeField(_("invited at"), null=True, blank=True)
    joined_at = models.DateTimeField(_("joined at"), null=True, blank=True)
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True, db_index=True)
    ends_at = models.DateTimeField(_("entitlement ends at"), null=True, blank=True)
    status = models.CharField(
        _("status"), max_length=16, choices=LeaseStatus.choices, default=LeaseStatus.PENDING, db_index=True
    )
    attempts = models.PositiveSmallIntegerField(_("attempts"), default=0)
    next_attempt_at = models.DateTimeField(_("next attempt at"), null=True, blank=True)
    last_error = models.TextField(_("last error"), blank=True)
    # The member's id at the provider (needed to remove them), learnt by the join sync.
    provider_member_id = models.CharField(_("member id at provider"), max_length=200, blank=True)
    # Join sync: consecutive syncs in which a pending lease was neither a member nor invited.
    missed_syncs = models.PositiveSmallIntegerField(_("missed syncs"), default=0)
    # Transfer bookkeeping: the team being moved to while ``transferring`` and how far it got.
    transfer_team = models.ForeignKey(
        Team,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="incoming_leases",
        verbose_name=_("transferring to"),
    )
    transfer_step = models.CharField(
        _("transfer step"), max_length=16, choices=TransferStep.choices, default=TransferStep.NONE, blank=True
    )
    # A worker's short claim on the lease while it talks to providers (crash: the claim lapses).
    claimed_until = models.DateTimeField(_("claimed until"), null=True, blank=True)
    claimed_by = models.CharField(_("claimed by"), max_length=64, blank=True)
    # An operator's cancel of a lease a worker holds: the worker honours it at its next step.
    cancel_requested_at = models.DateTimeField(_("cancel requested at"), null=True, blank=True)
    cancel_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("cancel requested by"),
    )
    cancel_reason = models.CharField(_("cancel reason"), max_length=500, blank=True)
    legacy_id = models.CharField(_("id in the old system"), max_length=64, null=True, blank=True, unique=True)

    class Meta:
        verbose_name = _("member lease")
        verbose_name_plural = _("member leases")
        ordering = ["-created_at", "-id"]
        # The dangerous console operations have permissions of their own (a clerk who may
        # retry a failed lease need not be able to move or end anyone's seat).
        permissions = [
            ("can_force_transfer", _("Can force a lease's transfer before its term ends")),
            ("can_cancel_lease", _("Can cancel a lease")),
        ]
        indexes = [
            models.Index(fields=["status", "expires_at"], name="lease_status_expires_idx"),
            models.Index(fields=["team", "status"], name="lease_team_status_idx"),
            models.Index(Lower("email"), name="lease_email_lower_idx"),
        ]
        constraints = [
            # One seat per customer: two open leases of one email (any teams, any case) cannot
            # be stored, whatever races the code above loses.
            models.UniqueConstraint(
                Lower("email"),
                condition=models.Q(status__in=NON_FINAL_STATUSES),
                name="lease_one_open_lease_per_email",
            ),
            models.CheckConstraint(
                condition=~models.Q(status=LeaseStatus.PENDING) | models.Q(joined_at__isnull=True),
                name="lease_pending_not_joined",
            ),
            models.CheckConstraint(
                condition=models.Q(total_months__isnull=True) | models.Q(total_months__gte=models.F("term_months")),
                name="lease_total_covers_term",
            ),
            models.CheckConstraint(
                condition=models.Q(cancel_requested_at__isnull=True) | models.Q(status__in=NON_FINAL_STATUSES),
                name="lease_cancel_request_only_while_open",
            ),
            # A lease has a team unless it is waiting for one — and a waiting lease has none and
            # was never invited; cancelled while waiting, it stays without one.
            models.CheckConstraint(
                condition=models.Q(status=LeaseStatus.WAITING, team__isnull=True, invited_at__isnull=True)
                | models.Q(status=LeaseStatus.CANCELLED, team__isnull=True, invited_at__isnull=True)  # never seated
                | (~models.Q(status=LeaseStatus.WAITING) & models.Q(team__isnull=False)),
                name="lease_team_unless_waiting",
            ),
            models.CheckConstraint(condition=~models.Q(pool=""), name="lease_pool_set"),
            models.CheckConstraint(
                condition=models.Q(claimed_until__isnull=True) | ~models.Q(claimed_by=""),
                name="lease_claim_has_owner",
            ),
            models.CheckConstraint(
                condition=~models.Q(status=LeaseStatus.ACTIVE)
                | models.Q(joined_at__isnull=False, expires_at__isnull=False),
                name="lease_active_has_joined_and_expires",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in LeaseStatus]),
                name="lease_status_known",
            ),
            models.CheckConstraint(condition=models.Q(term_months__gte=1), name="lease_term_positive"),
            models.CheckConstraint(
                condition=models.Q(expires_at__isnull=True)
                | models.Q(joined_at__isnull=False, expires_at__gt=models.F("joined_at")),
                name="lease_expires_after_joined",
            ),
            models.CheckConstraint(
                condition=models.Q(status=LeaseStatus.TRANSFERRING)
                | models.Q(transfer_team__isnull=True, transfer_step=""),
                name="lease_transfer_fields_only_while_transferring",
            ),
            models.CheckConstraint(
                condition=models.Q(transfer_team__isnull=True) | ~models.Q(transfer_team=models.F("team")),
                name="lease_transfer_to_another_team",
            ),
        ]

    def __str__(self) -> str:
        # The team's name and the status in the operator's words (admin titles, breadcrumbs,
        # history). Lists select_related("team"), so this costs no query there.
        where = self.team.name if self.team_id else _("no team yet")
        return f"{self.email} @ {where} ({self.get_status_display()})"


class AppendOnlyError(Exception):
    """Events are history: they are never changed or deleted."""


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs: object) -> int:
        raise AppendOnlyError(f"{self.model.__name__} rows are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError(f"{self.model.__name__} rows are append-only")


class AppendOnlyEvent(models.Model):
    """A history row: when, who (a user, or nobody for the system), what (``detail``).

    Append-only is enforced three times: the model refuses ``save()`` of an existing row and
    ``delete()``, its queryset refuses ``update()``/``delete()``, and on PostgreSQL a trigger
    refuses UPDATE and DELETE (except the actor becoming NULL when a user is deleted).
    """

    created_at = models.DateTimeField(_("at"), default=timezone.now, editable=False, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("operator"),
    )
    detail = models.JSONField(_("detail"), default=dict, blank=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True
        ordering = ["created_at", "id"]

    def save(self, *args: object, **kwargs: object) -> None:
        if not self._state.adding:
            raise AppendOnlyError(f"{type(self).__name__} rows are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError(f"{type(self).__name__} rows are append-only")


class LeaseEvent(AppendOnlyEvent):
    """The history of a lease: who did what, from which status to which."""

    lease = models.ForeignKey(MemberLease, on_delete=models.PROTECT, related_name="events", verbose_name=_("lease"))
    action = models.CharField(_("action"), max_length=32, choices=LeaseAction.choices)
    from_status = models.CharField(_("from status"), max_length=16, choices=LeaseStatus.choices, blank=True)
    to_status = models.CharField(_("to status"), max_length=16, choices=LeaseStatus.choices, blank=True)

    class Meta(AppendOnlyEvent.Meta):
        verbose_name = _("lease event")
        verbose_name_plural = _("lease events")

    def __str__(self) -> str:
        from leases.history import event_line

        return event_line(self).sentence


class TeamAction(models.TextChoices):
    HEALTH_CHANGED = "health_changed", _("health changed")
    NOTE = "note", _("note")


class TeamEvent(AppendOnlyEvent):
    """The history of a team: health changes (who or what decided, and why)."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="events", verbose_name=_("team"))
    action = models.CharField(_("action"), max_length=32, choices=TeamAction.choices)
    from_health = models.CharField(_("from"), max_length=16, choices=TeamHealth.choices, blank=True)
    to_health = models.CharField(_("to"), max_length=16, choices=TeamHealth.choices, blank=True)

    class Meta(AppendOnlyEvent.Meta):
        verbose_name = _("team event")
        verbose_name_plural = _("team events")

    def __str__(self) -> str:
        return f"{self.action} {self.from_health}->{self.to_health}"


class RedemptionCode(models.Model):
    """A code a customer redeems for a seat. Stored upper-case; matched case-insensitively."""

    code = models.CharField(_("code"), max_length=64, unique=True)
    term_months = models.PositiveSmallIntegerField(_("term (months)"))
    total_months = models.PositiveSmallIntegerField(_("entitlement (months)"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, editable=False)
    redeemed_at = models.DateTimeField(_("redeemed at"), null=True, blank=True)
    # Several codes point at one lease when they renewed it (the first one redeemed it).
    lease = models.ForeignKey(
        MemberLease,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="redemption_codes",
        verbose_name=_("lease"),
    )
    batch = models.CharField(_("batch"), max_length=100, blank=True, db_index=True)
    pool = models.CharField(_("pool"), max_length=50, default="default", db_index=True)

    class Meta:
        verbose_name = _("redemption code")
        verbose_name_plural = _("redemption codes")
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(Upper("code"), name="redemptioncode_code_ci_unique"),
            # Redeemed <=> points at its lease: a used code without a lease (or the reverse)
            # cannot be stored.
            models.CheckConstraint(
                condition=models.Q(redeemed_at__isnull=True, lease__isnull=True)
                | models.Q(redeemed_at__isnull=False, lease__isnull=False),
                name="redemptioncode_redeemed_iff_lease",
            ),
            models.CheckConstraint(condition=models.Q(term_months__gte=1), name="redemptioncode_term_positive"),
            models.CheckConstraint(condition=~models.Q(pool=""), name="redemptioncode_pool_set"),
            models.CheckConstraint(
                condition=models.Q(total_months__isnull=True) | models.Q(total_months__gte=models.F("term_months")),
                name="redemptioncode_total_covers_term",
            ),
        ]

    def __str__(self) -> str:
        return self.code

    @property
    def is_redeemed(self) -> bool:
        return self.redeemed_at is not None


@receiver(pre_delete, sender=RedemptionCode)
def _redeemed_codes_are_kept(sender: type, instance: RedemptionCode, **kwargs: object) -> None:
    """A redeemed code belongs to its lease's history: no delete path (admin, shell, cascade) may
    remove it."""
    if instance.redeemed_at is not None:
        raise ProtectedError(f"Redeemed code {instance.code} cannot be deleted.", {instance})
