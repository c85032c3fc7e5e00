"""Redemption codes: generate them in batches, export them, redeem one for a seat."""

from __future__ import annotations

import csv
import io
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from leases import events
from leases.models import NON_FINAL_STATUSES, LeaseStatus, MemberLease, RedemptionCode, Team
from leases.selectors import email_open_leases, team_choices
from leases.services.invites import lease_invite
from leases.services.transitions import LeaseError, lease_open, lease_step, seat_take_first
from leases.timeutils import add_months

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


POOL_PATTERN = re.compile(r"[\w.-]{1,50}")


def pool_normalize(pool: str | None) -> str:
    """A pool label (letters, digits, ``_ . -``, at most 50); empty means ``default``."""
    value = (pool or "").strip() or "default"
    if not POOL_PATTERN.fullmatch(value):
        raise LeaseError(
            _("A pool is a short label of letters, digits, _ . or - (at most 50), got %(pool)r.") % {"pool": value[:60]}
        )
    return value


def codes_generate(
    *, count: int, term_months: int, total_months: int | None = None, batch: str = "", pool: str = "default"
) -> list[str]:
    """Create ``count`` new codes in one batch of ``pool``; returns them. All or nothing."""
    pool = pool_normalize(pool)
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
                        RedemptionCode(
                            code=code, term_months=term_months, total_months=total_months, batch=batch, pool=pool
                        )
                        for code in codes
                    ]
                )
        except IntegrityError:  # a collision with an existing code (31^16 makes this very rare)
            continue
        return sorted(codes)
    raise LeaseError(_("Could not generate unique codes; try again."))


CSV_HEADER = ["code", "term_months", "total_months", "batch", "created_at", "redeemed_at", "email", "pool"]
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
                code.pool,
            ]
        )
    return out.getvalue()


ALREADY_SEATED = gettext_lazy("This email already has a seat. Check its status page, or contact support to extend it.")


MAX_TOTAL_MONTHS = 1200  # a renewal never grows an entitlement past a hundred years


class RenewalRefusedError(RedemptionError):
    pass


def code_redeem(*, code: str, email: str, invite_later: bool = False) -> MemberLease:
    """Redeem ``code`` for ``email`` (DESIGN §5): exactly one lease per code, even under a double
    submit, and one open lease per email, even when several codes are redeemed for it at once.

    - No open lease: a new lease in a team of the code's pool with a free seat (``pending``,
      invited after the commit), or — every team full — a ``waiting`` lease, seated first come,
      first served as seats free (``leases.services.waiting``). An email whose lease expired at
      most ``LEASE_RENEWAL_GRACE_DAYS`` ago continues it: a fresh lease, in its last team when
      that team has a free seat.
    - An open lease of this email: the code renews it — its entitlement grows by the code's
      ``total_months`` (else ``term_months``); a lease rotating until cancelled (no entitlement
      end) refuses, and the code stays unused.

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
        lease, outcome = _redeem_in_transaction(canonical=canonical, email=email)
    except IntegrityError:
        if MemberLease.objects.filter(email__iexact=email, status__in=NON_FINAL_STATUSES).exists():
            raise RedemptionError(str(ALREADY_SEATED)) from None
        raise
    if outcome != "repeat":
        lowseats_check_later(pool=lease.pool)
    if outcome == "created":
        if invite_later:
            from leases.tasks import invite_lease

            transaction.on_commit(lambda: invite_lease.delay(lease_id=lease.pk))
        else:
            lease_invite(lease_id=lease.pk)
            lease.refresh_from_db()
    return lease


def lowseats_check_later(*, pool: str) -> None:
    """The low-seat alert looks at the pool after the commit (never failing the redemption)."""
    from leases.services.lowseats import lowseats_check

    transaction.on_commit(lambda: lowseats_check(pool=pool))


def _redeem_in_transaction(*, canonical: str, email: str) -> tuple[MemberLease, str]:
    """The lease and what happened: ``created``, ``waiting``, ``renewed`` or ``repeat`` (a double
    submit gets the existing lease)."""
    now = timezone.now()
    with transaction.atomic():
        try:
            redemption = RedemptionCode.objects.select_for_update().get(code__iexact=canonical)
        except RedemptionCode.DoesNotExist:
            raise RedemptionError(_("This code does not exist. Check it and try again.")) from None
        if redemption.redeemed_at is not None:
            lease = redemption.lease
            if lease is not None and lease.email == email:
                return lease, "repeat"  # a double submit by the same customer
            raise CodeAlreadyUsedError(_("This code has already been used."))
        open_lease = email_open_leases(email).select_for_update().first()
        if open_lease is not None:
            return _renew(open_lease, redemption, now), "renewed"
        # Teams are chosen by their seat counters without locks; the seat is taken by a
        # conditional UPDATE of the one chosen team's row (the next team when it just filled),
        # so two redemptions (or a redemption and a waiting-list drain) never take the same last
        # seat, and redemptions into different teams never wait for each other.
        pool = redemption.pool
        teams = [c.team for c in team_choices(term_months=redemption.term_months, email=email, pool=pool, now=now)]
        previous = _recently_expired(email=email, now=now) if teams else None
        if previous is not None:  # within the grace period: back to its last team if it has room
            teams.sort(key=lambda team: team.pk != previous.team_id)  # stable: the rest keep their order
        seated = seat_take_first(
            teams=teams,
            attempt=lambda team: _open_lease(redemption, email=email, pool=pool, team=team, now=now, reopens=previous),
        )
        if seated is None:
            return _open_lease(redemption, email=email, pool=pool, team=None, now=now), "waiting"
        lease = seated[1]
    return lease, "created"


def _claim_code(redemption: RedemptionCode, lease: MemberLease, now: datetime) -> None:
    claimed = RedemptionCode.objects.filter(pk=redemption.pk, redeemed_at__isnull=True).update(
        redeemed_at=now, lease=lease
    )
    if claimed != 1:
        raise CodeAlreadyUsedError(_("This code has already been used."))


def _open_lease(
    redemption: RedemptionCode,
    *,
    email: str,
    pool: str,
    team: Team | None,
    now: datetime,
    reopens: MemberLease | None = None,
) -> MemberLease:
    """The new lease of a redemption: ``pending`` in ``team``, or — every team of the pool full,
    ``team`` None — ``waiting``, seated when a seat frees. The code points at it, and its first
    event opens the history (creation is not a transition: there is no "from")."""
    if team is None:
        event = events.waiting(code=redemption.code, pool=pool, term_months=redemption.term_months)
    else:
        event = events.redeemed(
            code=redemption.code,
            team=team,
            term_months=redemption.term_months,
            reopens=reopens.pk if reopens is not None else None,
        )
    # The seat is taken (or TeamFullError raised, nothing written) by the transition module.
    lease = lease_open(
        team=team,
        event=event,
        now=now,
        email=email,
        pool=pool,
        term_months=redemption.term_months,
        total_months=redemption.total_months,
    )
    _claim_code(redemption, lease, now)
    return lease


def _recently_expired(*, email: str, now: datetime) -> MemberLease | None:
    grace = settings.LEASE_RENEWAL_GRACE_DAYS
    if grace <= 0:
        return None
    return (
        MemberLease.objects.alias(email_lower=Lower("email"))
        .filter(email_lower=email.lower(), status=LeaseStatus.EXPIRED, ends_at__gte=now - timedelta(days=grace))
        .order_by("-ends_at", "-pk")
        .first()
    )


def _renew(lease: MemberLease, redemption: RedemptionCode, now: datetime) -> MemberLease:
    """The code extends the open lease's entitlement; one ``renewed`` event, the code points at it."""
    if lease.pool != redemption.pool:
        raise RenewalRefusedError(
            _(
                "This code is for another kind of seat than the one this email already has; it was not used. "
                "Contact support."
            )
        )
    if lease.total_months is None:
        raise RenewalRefusedError(
            _(
                "This email's seat has no end date (it continues until cancelled), so there is nothing to extend. "
                "The code was not used."
            )
        )
    months = redemption.total_months or redemption.term_months
    total = lease.total_months + months
    if total > MAX_TOTAL_MONTHS:
        raise RenewalRefusedError(_("This seat cannot be extended any further. The code was not used."))
    ends_at = add_months(lease.ends_at, months) if lease.ends_at is not None else None
    changes: dict = {"total_months": total}
    if ends_at is not None:
        changes["ends_at"] = ends_at
    renewed = lease_step(
        lease_id=lease.pk,
        changes=changes,
        **events.renewed(
            code=redemption.code, months=months, total_months=total, ends_at_before=lease.ends_at, ends_at=ends_at
        ),
    )
    _claim_code(redemption, renewed, now)
    return renewed


redeem = code_redeem  # the name operators and DESIGN use
