"""Team health (DESIGN §4): healthy, degraded (its listings fail transiently) or dead (its
provider refused the credentials or the workspace is deactivated, or an operator said so).

A dead team takes no redemptions and no transfers in, and the transfer executor evacuates its open
leases. Every change is a ``TeamEvent`` and alerts once (``leasesite.notify``): a team becoming
degraded or dead is a problem announced when it starts; back to healthy sends "resolved".
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from leases.models import Team, TeamAction, TeamEvent, TeamHealth
from leases.providers import ProviderError, TeamDeadError
from leasesite.notify import alert_problem, alert_resolved

logger = logging.getLogger(__name__)


def health_alert_key(team_id: int) -> str:
    return f"leases:team:{team_id}:health"


def team_health_set(
    *, team_id: int, health: str, reason: str, actor_id: int | None = None, only_from: tuple[str, ...] = ()
) -> bool:
    """Set a team's health (compare-and-swap on the current value); True when it changed.

    ``only_from`` restricts the change to teams currently in those states (a transient failure
    degrades a healthy team but never "heals" a dead one).
    """
    health = TeamHealth(health)
    now = timezone.now()
    with transaction.atomic():
        team = Team.objects.select_for_update().get(pk=team_id)
        previous = team.health
        if previous == health or (only_from and previous not in only_from):
            return False
        Team.objects.filter(pk=team.pk, health=previous).update(
            health=health, health_changed_at=now, health_reason=reason[:500]
        )
        TeamEvent.objects.create(
            team=team,
            action=TeamAction.HEALTH_CHANGED,
            from_health=previous,
            to_health=health,
            actor_id=actor_id,
            created_at=now,
            detail={"reason": reason[:500]},
        )
    logger.warning("team %s health %s -> %s: %s", team.name, previous, health, reason)
    key = health_alert_key(team.pk)
    if health == TeamHealth.HEALTHY:
        alert_resolved(
            key=key,
            title=_("Team %(team)s is healthy again") % {"team": team.name},
            body=_("Reason: %(reason)s") % {"reason": reason},
        )
    else:
        label = TeamHealth(health).label
        body = (
            _("%(reason)s. It takes no new members; its leases are moved to a healthy team of pool %(pool)s.")
            if health == TeamHealth.DEAD
            else _("%(reason)s. Its seats are still used; the next sync tries again.")
        ) % {"reason": reason, "pool": team.pool}
        alert_problem(
            key=key,
            title=_("Team %(team)s is %(health)s") % {"team": team.name, "health": label},
            body=body,
            level="error" if health == TeamHealth.DEAD else "warning",
            fingerprint=health,
        )
    return True


def team_record_provider_error(*, team: Team, error: ProviderError, during: str) -> None:
    """What a provider error says about the team: dead on 401/403/402, degraded when a listing
    failed transiently. Other errors say nothing about the team."""
    if isinstance(error, TeamDeadError):
        team_health_set(
            team_id=team.pk,
            health=TeamHealth.DEAD,
            reason=_("%(during)s: %(error)s") % {"during": during, "error": error},
        )
    elif error.transient and during == "listing":
        team_health_set(
            team_id=team.pk,
            health=TeamHealth.DEGRADED,
            reason=_("listing failed: %(error)s") % {"error": error},
            only_from=(TeamHealth.HEALTHY,),
        )


def team_record_listing_ok(*, team: Team) -> None:
    """A full listing worked: a degraded team is healthy again (a dead one stays dead until an
    operator, who fixed its credentials, says otherwise)."""
    if team.health == TeamHealth.DEGRADED:
        team_health_set(
            team_id=team.pk,
            health=TeamHealth.HEALTHY,
            reason=_("listings work again"),
            only_from=(TeamHealth.DEGRADED,),
        )
