from __future__ import annotations

import logging

import pytest
from django.utils.translation import gettext as _

from leases.models import LeaseStatus
from leases.providers import TransientProviderError
from leases.services.orphans import orphans_check

pytestmark = pytest.mark.django_db


def test_reports_double_seats_members_without_lease_and_unseated_leases(provider, make_team, make_lease, caplog):
    a, b = make_team("a"), make_team("b")
    fine = make_lease(a, LeaseStatus.ACTIVE)
    provider.state.team("a").add_member(fine.email)
    double = make_lease(a, LeaseStatus.ACTIVE)
    provider.state.team("a").add_member(double.email)
    provider.state.team("b").add_member(double.email)  # seated in two teams
    provider.state.team("b").add_member("stranger@example.com")  # seated without a lease
    gone = make_lease(b, LeaseStatus.ACTIVE)  # active, but not among b's members

    with caplog.at_level(logging.WARNING, logger="leasesite.alerts"):
        report = orphans_check()

    assert report.teams_checked == 2
    assert report.in_several_teams == {double.email: ["a", "b"]}
    assert sorted(report.without_lease["b"]) == sorted([double.email, "stranger@example.com"])
    assert "a" not in report.without_lease
    assert report.active_not_seated == {"b": [gone.email]}
    assert report.problems == 4
    assert any(_("Orphan check: %(count)d problem(s)") % {"count": 4} in r.getMessage() for r in caplog.records)
    assert "stranger@example.com" in report.as_text()


def test_mid_transfer_double_seat_is_expected(provider, make_team, make_lease):
    a, b = make_team("a"), make_team("b")
    lease = make_lease(a, LeaseStatus.TRANSFERRING, transfer_team=b)
    provider.state.team("a").add_member(lease.email)
    provider.state.team("b").add_member(lease.email)
    report = orphans_check()
    assert report.problems == 0 and report.as_text() == ""


def test_a_team_that_cannot_be_listed_is_reported(provider, make_team, caplog):
    make_team("a")
    provider.state.team("a").fail_next.append(TransientProviderError("x", status=502))
    report = orphans_check(alert=False)
    assert "502" in report.teams_failed["a"]
    assert report.teams_checked == 0
