"""Team providers: how the lease engine reads and changes a team's members and invites.

``provider_for(team)`` returns the implementation named by ``team.provider``:

- ``http``: the JSON contract of DESIGN §4 (``leases.providers.http``);
- ``memory``: an in-process fake for tests and experiments (``leases.providers.memory``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leases.providers.base import (
    PermanentProviderError,
    ProviderError,
    ProviderInvite,
    ProviderMember,
    TeamDeadError,
    TeamProvider,
    TransientProviderError,
)

if TYPE_CHECKING:
    from leases.models import Team

PROVIDER_CHOICES = [("http", "http"), ("memory", "memory")]


def provider_for(team: Team) -> TeamProvider:
    if team.provider == "http":
        from leases.providers.http import HttpTeamProvider

        return HttpTeamProvider(api_base=team.api_base, api_token=team.api_token or "")
    if team.provider == "memory":
        from leases.providers.memory import memory_provider

        return memory_provider(team.api_base or team.name)
    raise PermanentProviderError(f"team {team.name!r} names an unknown provider {team.provider!r}")


__all__ = [
    "PROVIDER_CHOICES",
    "PermanentProviderError",
    "ProviderError",
    "ProviderInvite",
    "ProviderMember",
    "TeamDeadError",
    "TeamProvider",
    "TransientProviderError",
    "provider_for",
]
