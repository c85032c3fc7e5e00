"""A lease's history for people: one sentence per event, details as labelled fields.

Events store facts (``leases.events``) in a JSON ``detail``; this module only words them, in the
active language, so changing a sentence never touches stored history. Each sentence names the
detail keys it uses; what it does not use is shown below it as "label: value".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext_lazy as _

from leases.models import LeaseAction, LeaseEvent, LeaseStatus

# action -> (sentence, the detail keys it consumes)
SENTENCES: dict[str, tuple[Any, tuple[str, ...]]] = {
    LeaseAction.REDEEMED: (
        _("Redeemed code %(code)s; seat in team %(team)s, %(term_months)s month(s) per team."),
        ("code", "team", "term_months"),
    ),
    LeaseAction.INVITED: (_("Invited to team %(team)s."), ("team",)),
    LeaseAction.INVITE_FAILED: (_("The invite to team %(team)s failed: %(error)s"), ("team", "error")),
    LeaseAction.REINVITED: (_("Invited to team %(team)s again."), ("team",)),
    LeaseAction.JOINED: (_("Joined team %(team)s; this term ends %(expires_at)s."), ("team", "expires_at")),
    LeaseAction.MEMBER_SEEN: (_("Member id at team %(team)s learnt."), ("team",)),
    LeaseAction.TRANSFER_STARTED: (_("Transfer out of team %(from_team)s started."), ("from_team",)),
    LeaseAction.TARGET_CHOSEN: (_("Team %(to_team)s chosen as the next team."), ("to_team",)),
    LeaseAction.LEFT_OLD_TEAM: (_("Seat in team %(team)s freed."), ("team",)),
    LeaseAction.TRANSFERRED: (_("Moved from team %(from_team)s to team %(to_team)s."), ("from_team", "to_team")),
    LeaseAction.TRANSFER_RETRY: (
        _("Transfer attempt %(attempt)s failed; next try at %(next_attempt_at)s: %(error)s"),
        ("attempt", "next_attempt_at", "error"),
    ),
    LeaseAction.TRANSFER_FAILED: (
        _("Transfer failed after %(attempts)s attempt(s) and needs a human: %(error)s"),
        ("attempts", "error"),
    ),
    LeaseAction.EXPIRED: (_("Entitlement over: the lease expired (last team %(team)s)."), ("team",)),
    LeaseAction.CANCEL_REQUESTED: (_("Cancel requested: %(reason)s"), ("reason",)),
    LeaseAction.CANCELLED: (_("Cancelled: %(reason)s"), ("reason",)),
    LeaseAction.SEAT_NOT_FREED: (_("The seat in team %(team)s could not be freed: %(error)s"), ("team", "error")),
    LeaseAction.RESET: (_("Reset to active by an operator."), ()),
    LeaseAction.RETRY: (_("Transfer retried by an operator."), ()),
    LeaseAction.EDITED: (_("Edited by an operator."), ()),
    LeaseAction.IMPORTED: (_("Imported from the old system."), ()),
    LeaseAction.NOTE: (_("Note: %(note)s"), ("note",)),
}

DETAIL_LABELS: dict[str, Any] = {
    "team": _("team"),
    "from_team": _("from team"),
    "to_team": _("to team"),
    "failed_team": _("team that failed"),
    "error": _("error"),
    "previous_error": _("previous error"),
    "reason": _("reason"),
    "attempts": _("attempts"),
    "attempt": _("attempt"),
    "permanent": _("permanent error"),
    "member_id": _("member id"),
    "joined_at": _("joined at"),
    "expires_at": _("term ends at"),
    "provider_joined_at": _("joined at (provider)"),
    "term_expired_at": _("term ended at"),
    "entitlement_over": _("entitlement over"),
    "forced": _("forced by an operator"),
    "evacuation": _("evacuated from a dead team"),
    "transfer": _("as a transfer"),
    "missed_syncs": _("missed syncs"),
    "previous": _("previous choice"),
    "member_of": _("member of"),
    "whereabouts_unknown": _("could not check"),
    "invite_withdrawn": _("invite withdrawn"),
    "withdraw_error": _("withdrawal error"),
    "removed_from_target": _("removed from the next team"),
    "skipped": _("skipped"),
    "ends_at": _("entitlement ends at"),
    "withdrawn_from": _("invite withdrawn from"),
    "requested_at": _("requested at"),
    "busy_with": _("worker busy with it"),
    "changes": _("changes"),
    "note": _("note"),
    "source": _("source"),
    "code": _("code"),
    "term_months": _("months per team"),
    "next_attempt_at": _("next try at"),
}


@dataclass(frozen=True)
class HistoryLine:
    at: datetime
    actor: str
    sentence: str
    status_change: str
    details: list[tuple[str, str]]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(_("yes") if value else _("no"))
    if isinstance(value, list):
        return ", ".join(_value(item) for item in value) or "-"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_value(item)}" for key, item in value.items())
    if isinstance(value, str):
        moment = parse_datetime(value) if len(value) >= 19 and value[4:5] == "-" else None
        if moment is not None:
            if timezone.is_naive(moment):
                moment = timezone.make_aware(moment)
            return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")
    return "-" if value is None or value == "" else str(value)


def _status(value: str) -> str:
    return str(LeaseStatus(value).label) if value in LeaseStatus.values else value


def event_line(event: LeaseEvent) -> HistoryLine:
    detail = event.detail if isinstance(event.detail, dict) else {}
    sentence, used = SENTENCES.get(event.action, (None, ()))
    words = defaultdict(lambda: "-", {key: _value(detail.get(key)) for key in used})
    text = str(sentence) % words if sentence is not None else str(event.get_action_display())
    if event.action == LeaseAction.EDITED and isinstance(detail.get("changes"), dict):
        text += " " + "; ".join(
            f"{field}: {_value(old)} → {_value(new)}" for field, (old, new) in detail["changes"].items()
        )
        used = (*used, "changes")
    change = ""
    if event.to_status and event.from_status != event.to_status:
        change = (
            f"{_status(event.from_status)} → {_status(event.to_status)}"
            if event.from_status
            else _status(event.to_status)
        )
    details = [
        (str(DETAIL_LABELS.get(key, key)), _value(value))
        for key, value in detail.items()
        if key not in used and value not in (None, "", [], {})
    ]
    actor = event.actor.get_username() if event.actor_id and event.actor else str(_("system"))
    return HistoryLine(timezone.localtime(event.created_at), actor, text, change, details)


def lease_history(lease_id: int, *, limit: int = 200) -> tuple[list[HistoryLine], int]:
    """The newest ``limit`` events of a lease, oldest first, and how many older ones were left out."""
    events = LeaseEvent.objects.filter(lease_id=lease_id).select_related("actor")
    total = events.count()
    newest = list(events.order_by("-created_at", "-id")[:limit])
    return [event_line(event) for event in reversed(newest)], max(0, total - limit)
