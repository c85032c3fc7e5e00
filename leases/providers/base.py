"""The Python interface every team provider implements (DESIGN §4), and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class ProviderMember:
    id: str
    email: str  # lower-cased by the provider adapter
    joined_at: datetime | None


@dataclass(frozen=True)
class ProviderInvite:
    email: str  # lower-cased by the provider adapter
    invited_at: datetime | None


class ProviderError(Exception):
    """A provider call that did not do what was asked. ``transient`` errors are worth retrying."""

    transient: bool = True

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """Timeouts, connection errors, HTTP 429 and 5xx, malformed answers."""

    transient = True


class PermanentProviderError(ProviderError):
    """The provider refused the request (bad credentials, bad request): retrying will not help."""

    transient = False


class TeamDeadError(PermanentProviderError):
    """The team itself is unusable: its credentials were refused (401/403) or its workspace is
    deactivated (402). The team is unhealthy, not the lease (DESIGN §4)."""


# HTTP answers that mean "this team is dead" rather than "this request was wrong".
TEAM_DEAD_STATUSES = frozenset({401, 402, 403})


class TeamProvider(Protocol):
    def list_members(self) -> list[ProviderMember]: ...

    def list_invites(self) -> list[ProviderInvite]: ...

    def invite(self, email: str) -> None:
        """Invite ``email``; already invited or already a member counts as done."""

    def remove_member(self, member_id: str) -> None:
        """Remove the member; "not a member" counts as done."""

    def cancel_invite(self, email: str) -> None:
        """Cancel the invite; "no such invite" counts as done."""

    @property
    def calls(self) -> int:
        """Provider calls made through this object (for statistics and benchmarks)."""
