"""Orphan check: who is seated or invited where the leases do not say, read from every team's
member and invite lists.

It alerts when its findings change (a digest of them is the alert's fingerprint), not on every
hourly run, and says "resolved" when they are gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from django.utils.translation import gettext as _

from leases.models import LeaseStatus, MemberLease, Team, TeamHealth
from leases.providers import ProviderError, provider_for
from leases.services.transitions import teams_seats_recount
from leasesite.notify import alert_problem, alert_resolved

logger = logging.getLogger(__name__)

MAX_LISTED = 20
ORPHANS_ALERT_KEY = "leases:orphans"


@dataclass
class OrphanReport:
    teams_checked: int = 0
    teams_failed: dict[str, str] = field(default_factory=dict)
    in_several_teams: dict[str, list[str]] = field(default_factory=dict)  # email -> team names
    without_lease: dict[str, list[str]] = field(default_factory=dict)  # team -> emails
    invites_without_lease: dict[str, list[str]] = field(default_factory=dict)  # team -> emails
    active_not_seated: dict[str, list[str]] = field(default_factory=dict)  # team -> emails
    # Seat counters that differed from a recount of the leases (and were set to it): team ->
    # (counter, recount). Only a write behind the transition function's back causes one.
    seat_drift: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def problems(self) -> int:
        return (
            len(self.in_several_teams)
            + sum(map(len, self.without_lease.values()))
            + sum(map(len, self.invites_without_lease.values()))
            + sum(map(len, self.active_not_seated.values()))
            + len(self.seat_drift)
        )

    def fingerprint(self) -> str:
        findings = [
            sorted(self.in_several_teams.items()),
            sorted(self.without_lease.items()),
            sorted(self.invites_without_lease.items()),
            sorted(self.active_not_seated.items()),
            sorted(self.teams_failed),
            sorted(self.seat_drift.items()),
        ]
        return hashlib.sha256(json.dumps(findings, sort_keys=True).encode()).hexdigest()

    def as_text(self) -> str:
        lines = []
        for email, teams in sorted(self.in_several_teams.items())[:MAX_LISTED]:
            lines.append(f"{email} is a member of {len(teams)} teams: {', '.join(teams)}")
        for team, emails in sorted(self.without_lease.items()):
            lines.append(
                f"team {team}: {len(emails)} member(s) without a lease: {', '.join(sorted(emails)[:MAX_LISTED])}"
            )
        for team, emails in sorted(self.invites_without_lease.items()):
            lines.append(
                f"team {team}: {len(emails)} invite(s) without a lease: {', '.join(sorted(emails)[:MAX_LISTED])}"
            )
        for team, emails in sorted(self.active_not_seated.items()):
            listed = ", ".join(sorted(emails)[:MAX_LISTED])
            lines.append(f"team {team}: {len(emails)} active lease(s) not among its members: {listed}")
        for team, (counter, actual) in sorted(self.seat_drift.items()):
            lines.append(f"team {team}: seat counter said {counter}, its leases hold {actual} (corrected)")
        for team, error in sorted(self.teams_failed.items()):
            lines.append(f"team {team}: could not be listed ({error})")
        return "\n".join(lines)


def orphans_check(*, alert: bool = True) -> OrphanReport:
    report = OrphanReport()
    # The seat counters first: recounted under each team row's lock, corrected where they drifted.
    report.seat_drift = teams_seats_recount()
    teams = list(Team.objects.filter(is_active=True).exclude(health=TeamHealth.DEAD).order_by("pk"))
    # Where each email may legitimately be seated: its open leases' teams (and transfer targets).
    allowed: dict[str, set[int]] = defaultdict(set)
    active_by_team: dict[int, set[str]] = defaultdict(set)
    open_leases = MemberLease.objects.filter(
        status__in=(LeaseStatus.PENDING, LeaseStatus.ACTIVE, LeaseStatus.TRANSFERRING, LeaseStatus.FAILED)
    ).values_list("email", "team_id", "transfer_team_id", "status")
    for email, team_id, transfer_team_id, status in open_leases.iterator(chunk_size=2000):
        email = email.lower()
        allowed[email].add(team_id)
        if transfer_team_id:
            allowed[email].add(transfer_team_id)
        if status == LeaseStatus.ACTIVE:
            active_by_team[team_id].add(email)

    seated_in: dict[str, list[Team]] = defaultdict(list)
    for team in teams:
        try:
            provider = provider_for(team)
            members = provider.list_members()
            invites = provider.list_invites()
        except ProviderError as exc:
            report.teams_failed[team.name] = str(exc)[:200]
            continue
        report.teams_checked += 1
        emails = {m.email for m in members}
        for email in emails:
            seated_in[email].append(team)
            if team.pk not in allowed.get(email, ()):
                report.without_lease.setdefault(team.name, []).append(email)
        # A stray invite (a withdrawal that failed, a cancel whose seat was not freed) would let
        # someone in whom no lease accounts for.
        for invite in invites:
            if team.pk not in allowed.get(invite.email, ()) and invite.email not in emails:
                report.invites_without_lease.setdefault(team.name, []).append(invite.email)
        missing = active_by_team.get(team.pk, set()) - emails
        if missing and emails:
            report.active_not_seated[team.name] = sorted(missing)
    # Seated in two teams is expected only mid-transfer (old team and the one it moves to).
    report.in_several_teams = {
        email: [t.name for t in seated]
        for email, seated in seated_in.items()
        if len(seated) > 1 and not {t.pk for t in seated} <= allowed.get(email, set())
    }

    if report.problems or report.teams_failed:
        logger.warning("orphan check found problems:\n%s", report.as_text())
        if alert:
            alert_problem(
                key=ORPHANS_ALERT_KEY,
                title=_("Orphan check: %(count)d problem(s)") % {"count": report.problems},
                body=report.as_text(),
                fingerprint=report.fingerprint(),
            )
    else:
        logger.info("orphan check: %d team(s), no problems", report.teams_checked)
        if alert:
            alert_resolved(key=ORPHANS_ALERT_KEY, title=_("Orphan check"), body=_("No problems found any more."))
    return report
