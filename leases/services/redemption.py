"""Redemption codes: generate them in batches, export them, redeem one for a seat."""

from __future__ import annotations

import csv
import io
import re
import secrets
from collections.abc import Iterable

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from leases import events
from leases.models import NON_FINAL_STATUSES, LeaseEvent, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.selectors import team_choices
from leases.services.invites import lease_invite
from leases.services.transitions import LeaseError

# No 0/O, 1/I/L: codes are read aloud and typed from screenshots.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_GROUPS, CODE_GROUP_SIZE = 4, 4
MAX_CODES_PER_BATCH = 10_000


class RedemptionError(LeaseError):
    """A redemption that cannot go ahead; the message is shown to the customer."""


class CodeAlreadyUsedError(RedemptionError):
    pass


class NoSeatsAvailableError(RedemptionError):
    pass


def email_normalize(email: str) -> str:
    email = (email or "").strip().lower()
    try:
        validate_email(email)
    except ValidationError:
        raise RedemptionError(_("Enter a valid email address.")) from None
    return email


def code_normalize(code: str) -> str:
    """Upper-case; a generated code typed without dashes or with spaces still matches."""
    compact = re.sub(r"[\s\-]+", "", (code or "").upper())
    if len(compact) == CODE_GROUPS * CODE_GROUP_SIZE and all(c in CODE_ALPHABET for c in compact):
        return "-".join(compact[i : i + CODE_GROUP_SIZE] for i in range(0, len(compact), CODE_GROUP_SIZE))
    return (code or "").strip().upper()


def code_new() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_GROUPS * CODE_GROUP_SIZE))
    return "-".join(raw[i : i + CODE_GROUP_SIZE] for i in range(0, len(raw), CODE_GROUP_SIZE))


def codes_generate(*, count: int, term_months: int, total_months: int | None = None, batch: str = "") -> list[str]:
    """Create ``count`` new codes in one batch; returns them. All or nothing."""
    if not 1 <= count <= MAX_CODES_PER_BATCH:
        raise LeaseError(_("The number of codes must be between 1 and %(max)d.") % {"max": MAX_CODES_PER_BATCH})
    if term_months < 1:
        raise LeaseError(_("The term must be at least one month."))
    if total_months is not None and total_months < term_months:
        raise LeaseError(_("The entitlement cannot be shorter than one term."))
    batch = batch.strip() or timezone.localtime().strftime("batch-%Y%m%d-%H%M%S")
    for _attempt in range(5):
        codes = {code_new() for _ in range(count)}
        if len(codes) < count:
            continue
        try:
            with transaction.atomic():
                RedemptionCode.objects.bulk_create(
                    [
                        RedemptionCode(code=code, term_months=term_months, total_months=total_months, batch=batch)
                        for code in codes
                    ]
                )
        except IntegrityError:  # a collision with an existing code (31^16 makes this very rare)
            continue
        return sorted(codes)
    raise LeaseError(_("Could not generate unique codes; try again."))


CSV_HEADER = ["code", "term_months", "total_months", "batch", "created_at", "redeemed_at", "email"]
# A cell starting with one of these is a formula to Excel/LibreOffice (CSV injection, OWASP).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """Defuse a text cell a spreadsheet would run as a formula (``=1+2@example.com``) by prefixing
    a single quote; numbers and empty cells are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def codes_export_csv(codes: Iterable[RedemptionCode]) -> str:
    """CSV of codes (with the redeeming email, if any). Pass a queryset with select_related."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for code in codes:
        writer.writerow(
            csv_safe(cell)
            for cell in [
                code.code,
                code.term_months,
                code.total_months if code.total_months is not None else "",
                code.batch,
                timezone.localtime(code.created_at).isoformat(timespec="seconds"),
                timezone.localtime(code.redeemed_at).isoformat(timespec="seconds") if code.redeemed_at else "",
                code.lease.email if code.lease_id else "",
            ]
        )
    return out.getvalue()


ALREADY_SEATED = gettext_lazy("This email already has a seat. Check its status page, or contact support to extend it.")


def code_redeem(*, code: str, email: str, invite_later: bool = False) -> MemberLease:
    """Redeem ``code`` for ``email``: exactly one lease per code, even under a double submit, and
    one open lease per email, even when several codes are redeemed for it at the same moment.

    The code row is locked (PostgreSQL; SQLite's IMMEDIATE transactions serialize writers), so a
    second submission waits and then sees the code used. The same email submitting the same code
    again gets its lease back instead of an error. Two *different* codes for one email race past
    the open-lease check; the database's unique index on the open leases' lower-cased email lets
    exactly one insert win, the other transaction rolls back whole (its code stays unused) and
    its customer is told the email already has a seat. The invite is sent after the commit —
    with ``invite_later`` (the web page: no provider call inside a request) by the
    ``leases.invite_lease`` task.
    """
    email = email_normalize(email)
    canonical = code_normalize(code)
    if not canonical:
        raise RedemptionError(_("Enter a redemption code."))
    try:
        lease, created = _redeem_in_transaction(canonical=canonical, email=email)
    except IntegrityError:
        if MemberLease.objects.filter(email__iexact=email, status__in=NON_FINAL_STATUSES).exists():
            raise RedemptionError(str(ALREADY_SEATED)) from None
        raise
    if created and invite_later:
        from leases.tasks import invite_lease

        transaction.on_commit(lambda: invite_lease.delay(lease_id=lease.pk))
    elif created:
        lease_invite(lease_id=lease.pk)
        lease.refresh_from_db()
    return lease


def _redeem_in_transaction(*, canonical: str, email: str) -> tuple[MemberLease, bool]:
    """The lease and whether this call created it (a double submit gets the existing one)."""
    now = timezone.now()
    with transaction.atomic():
        try:
            redemption = RedemptionCode.objects.select_for_update().get(code__iexact=canonical)
        except RedemptionCode.DoesNotExist:
            raise RedemptionError(_("This code does not exist. Check it and try again.")) from None
        if redemption.redeemed_at is not None:
            lease = redemption.lease
            if lease is not None and lease.email == email:
                return lease, False  # a double submit by the same customer
            raise CodeAlreadyUsedError(_("This code has already been used."))
        if MemberLease.objects.filter(email__iexact=email, status__in=NON_FINAL_STATUSES).exists():
            raise RedemptionError(str(ALREADY_SEATED))
        # Lock every active team (in one order) while counting seats, so two redemptions never take
        # the same last seat.
        list(Team.objects.filter(is_active=True).order_by("pk").select_for_update().values_list("pk", flat=True))
        choices = team_choices(term_months=redemption.term_months, email=email, now=now)
        if not choices:
            raise NoSeatsAvailableError(_("No seats are available right now. Your code was not used; try again later."))
        team = choices[0].team
        lease = MemberLease.objects.create(
            email=email,
            team=team,
            term_months=redemption.term_months,
            total_months=redemption.total_months,
            status=LeaseStatus.PENDING,
            created_at=now,
        )
        claimed = RedemptionCode.objects.filter(pk=redemption.pk, redeemed_at__isnull=True).update(
            redeemed_at=now, lease=lease
        )
        if claimed != 1:
            raise CodeAlreadyUsedError(_("This code has already been used."))
        # Creation is not a transition (there is no "from"): the redemption event opens the history.
        LeaseEvent.objects.create(
            lease=lease,
            to_status=LeaseStatus.PENDING,
            created_at=now,
            **events.redeemed(code=redemption.code, team=team, term_months=redemption.term_months),
        )
    return lease, True


redeem = code_redeem  # the name operators and DESIGN use
