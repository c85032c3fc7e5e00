"""One helper per lease event (saleor's ``order/events.py``): the one place that says what each
event records.

Each helper returns the ``action`` and ``detail`` keyword arguments of the transition function, so
a call reads ``lease_transition(lease_id=..., to_status=..., **events.transferred(...))``. Details
hold names, counts and ISO times only — never a secret, never a model object.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from leases.models import LeaseAction, Team

Event = dict[str, Any]  # {"action": ..., "detail": {...}}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _name(team: Team | None) -> str | None:
    return team.name if team is not None else None


def _event(action: str, **detail: Any) -> Event:
    return {"action": LeaseAction(action), "detail": {k: v for k, v in detail.items() if v is not None}}


def redeemed(*, code: str, team: Team, term_months: int, reopens: int | None = None) -> Event:
    """``reopens``: the expired lease (within the renewal grace period) this redemption continues."""
    return _event(LeaseAction.REDEEMED, code=code, team=team.name, term_months=term_months, reopens=reopens)


def invited(*, team: Team, transfer: bool = False, reason: str = "") -> Event:
    return _event(LeaseAction.INVITED, team=team.name, transfer=transfer or None, reason=reason or None)


def invite_failed(*, team: Team, error: str, reason: str = "") -> Event:
    return _event(LeaseAction.INVITE_FAILED, team=team.name, error=error[:500], reason=reason or None)


def reinvited(*, team: Team, missed_syncs: int) -> Event:
    return _event(
        LeaseAction.REINVITED,
        team=team.name,
        reason=f"neither a member nor invited for {missed_syncs} syncs",
        missed_syncs=missed_syncs,
    )


def joined(
    *, team: Team, member_id: str, joined_at: datetime, expires_at: datetime, provider_joined_at: datetime | None
) -> Event:
    return _event(
        LeaseAction.JOINED,
        team=team.name,
        member_id=member_id,
        joined_at=_iso(joined_at),
        expires_at=_iso(expires_at),
        # The provider's own join time, when it is earlier than our invite (a member it already
        # knew): the term starts at our invite, not then.
        provider_joined_at=_iso(provider_joined_at) if provider_joined_at and provider_joined_at != joined_at else None,
    )


def member_seen(*, team: Team, member_id: str) -> Event:
    return _event(LeaseAction.MEMBER_SEEN, team=team.name, member_id=member_id)


def transfer_started(
    *,
    from_team: Team,
    to_team: Team | None,
    term_expired_at: datetime | None,
    entitlement_over: bool,
    forced: bool = False,
    evacuation: bool = False,
) -> Event:
    return _event(
        LeaseAction.TRANSFER_STARTED,
        from_team=from_team.name,
        to_team=_name(to_team),
        term_expired_at=_iso(term_expired_at),
        entitlement_over=entitlement_over,
        forced=forced or None,
        evacuation=evacuation or None,
    )


def target_chosen(*, to_team: Team, previous: Team | None = None, reason: str = "") -> Event:
    return _event(LeaseAction.TARGET_CHOSEN, to_team=to_team.name, previous=_name(previous), reason=reason or None)


def left_old_team(*, team: Team, freed: dict | None = None, skipped: str = "") -> Event:
    """The seat in ``team`` was freed (``freed`` says how), or the removal was ``skipped`` (why)."""
    return _event(LeaseAction.LEFT_OLD_TEAM, team=team.name, skipped=skipped or None, **(freed or {}))


def transferred(*, from_team: Team, to_team: Team) -> Event:
    return _event(LeaseAction.TRANSFERRED, from_team=from_team.name, to_team=to_team.name)


def transfer_retry(*, error: str, attempt: int, next_attempt_at: datetime, team: Team | None = None) -> Event:
    return _event(
        LeaseAction.TRANSFER_RETRY,
        error=error[:500],
        attempt=attempt,
        next_attempt_at=_iso(next_attempt_at),
        failed_team=_name(team),
    )


def transfer_failed(
    *, error: str, attempts: int, permanent: bool, failed_team: Team | None, whereabouts: dict[str, Any]
) -> Event:
    """``whereabouts`` records where the member really is after the give-up (DESIGN: a failed
    lease needs a human, who must know which teams to look at)."""
    return _event(
        LeaseAction.TRANSFER_FAILED,
        error=error[:500],
        attempts=attempts,
        permanent=permanent,
        failed_team=_name(failed_team),
        **whereabouts,
    )


def expired(*, ends_at: datetime | None, team: Team, withdrawn_from: Team | None = None) -> Event:
    """``withdrawn_from``: the team a transfer had invited the member to before the entitlement
    ended (that invite was withdrawn)."""
    return _event(LeaseAction.EXPIRED, ends_at=_iso(ends_at), team=team.name, withdrawn_from=_name(withdrawn_from))


def cancel_requested(*, reason: str, claimed_by: str) -> Event:
    return _event(LeaseAction.CANCEL_REQUESTED, reason=reason[:500] or None, busy_with=claimed_by or None)


def cancelled(*, reason: str, requested_at: datetime | None = None) -> Event:
    return _event(LeaseAction.CANCELLED, reason=reason[:500], requested_at=_iso(requested_at))


def seat_not_freed(*, team: Team, error: str) -> Event:
    return _event(LeaseAction.SEAT_NOT_FREED, team=team.name, error=error[:300])


def reset(*, previous_error: str) -> Event:
    return _event(LeaseAction.RESET, previous_error=previous_error[:500])


def retry(*, previous_error: str) -> Event:
    return _event(LeaseAction.RETRY, previous_error=previous_error[:500])


def edited(*, changes: dict[str, tuple[Any, Any]]) -> Event:
    """``changes``: field -> (old, new), as JSON-friendly values."""
    return _event(LeaseAction.EDITED, changes={field: [old, new] for field, (old, new) in changes.items()})


def note(*, text: str, **extra: Any) -> Event:
    return _event(LeaseAction.NOTE, note=text[:1000], **extra)


def imported(*, source: str, **detail: Any) -> Event:
    """The old row's values as they were, empty ones included (what the import saw)."""
    return {"action": LeaseAction.IMPORTED, "detail": {**detail, "source": source}}


def waiting(*, code: str, pool: str, term_months: int) -> Event:
    """Redeemed while no team of ``pool`` had a free seat: the lease joins the waiting list."""
    return _event(LeaseAction.WAITING, code=code, pool=pool, term_months=term_months)


def seated(*, team: Team, waited_since: datetime) -> Event:
    """A seat freed: the waiting lease gets ``team`` (and is invited next)."""
    return _event(LeaseAction.SEATED, team=team.name, waited_since=_iso(waited_since))


def renewed(
    *, code: str, months: int, total_months: int, ends_at_before: datetime | None, ends_at: datetime | None
) -> Event:
    return _event(
        LeaseAction.RENEWED,
        code=code,
        months=months,
        total_months=total_months,
        ends_at_before=_iso(ends_at_before),
        ends_at=_iso(ends_at),
    )


def reminded(*, kind: str, days: int | None, ends_at: datetime | None, to: str) -> Event:
    """A reminder mail went out: ``kind`` ``ends`` (``days`` before ``ends_at``) or ``accept``."""
    return _event(LeaseAction.REMINDED, kind=kind, days=days, ends_at=_iso(ends_at), to=to)
