"""The lease fixtures live in tests/lease_fixtures.py (the integration tests use them too)."""

from tests.lease_fixtures import TEAM_TOKEN

__all__ = ["TEAM_TOKEN"]
