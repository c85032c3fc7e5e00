"""An in-memory team: the state behind the ``memory`` provider and the fake HTTP provider server.

``FakeTeam`` holds members and invites and counts calls. It can fail the next calls on purpose
(``fail_next``) and turn invites into members after a delay (``auto_join_after``), so tests, the
demo and the benchmark can play a whole lease life without a real provider.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from leases.providers.base import ProviderError, ProviderInvite, ProviderMember, TransientProviderError

_ids = itertools.count(1)


@dataclass
class FakeTeam:
    name: str
    members: dict[str, ProviderMember] = field(default_factory=dict)  # by id
    invites: dict[str, ProviderInvite] = field(default_factory=dict)  # by email
    auto_join_after: float | None = None  # seconds after which an invite is accepted; None = never
    calls: dict[str, int] = field(default_factory=dict)
    invite_posts: list[str] = field(default_factory=list)  # every POST invites, duplicates included
    fail_next: list[ProviderError] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def count(self, call: str) -> None:
        with self.lock:
            self.calls[call] = self.calls.get(call, 0) + 1
            if self.fail_next:
                raise self.fail_next.pop(0)

    def _accept_due_invites(self) -> None:
        if self.auto_join_after is None:
            return
        cutoff = datetime.now(UTC) - timedelta(seconds=self.auto_join_after)
        for email, invite in list(self.invites.items()):
            if invite.invited_at is None or invite.invited_at <= cutoff:
                self.accept(email)

    # -- test helpers ----------------------------------------------------------------------------
    def add_member(self, email: str, *, joined_at: datetime | None = None, member_id: str | None = None) -> str:
        with self.lock:
            email = email.lower()
            member_id = member_id or f"m{next(_ids)}"
            self.invites.pop(email, None)
            self.members[member_id] = ProviderMember(member_id, email, joined_at or datetime.now(UTC))
            return member_id

    def accept(self, email: str, *, joined_at: datetime | None = None) -> str:
        """The invited person accepts: the invite becomes a membership."""
        with self.lock:
            return self.add_member(email, joined_at=joined_at)

    def member_emails(self) -> set[str]:
        with self.lock:
            return {m.email for m in self.members.values()}

    def invited_emails(self) -> set[str]:
        with self.lock:
            return set(self.invites)

    def seated(self, email: str) -> bool:
        email = email.lower()
        return email in self.member_emails() or email in self.invited_emails()

    # -- the provider operations -------------------------------------------------------------------
    def list_members(self) -> list[ProviderMember]:
        with self.lock:
            self._accept_due_invites()
            return list(self.members.values())

    def list_invites(self) -> list[ProviderInvite]:
        with self.lock:
            self._accept_due_invites()
            return list(self.invites.values())

    def invite(self, email: str) -> bool:
        """True when a new invite was created (False: already invited or a member)."""
        with self.lock:
            email = email.lower()
            self.invite_posts.append(email)
            if email in self.invites or email in self.member_emails():
                return False
            self.invites[email] = ProviderInvite(email, datetime.now(UTC))
            return True

    def remove_member(self, member_id: str) -> bool:
        with self.lock:
            return self.members.pop(str(member_id), None) is not None

    def cancel_invite(self, email: str) -> bool:
        with self.lock:
            return self.invites.pop(email.lower(), None) is not None


_registry: dict[str, FakeTeam] = {}
_registry_lock = threading.Lock()


def fake_team(name: str) -> FakeTeam:
    with _registry_lock:
        return _registry.setdefault(name, FakeTeam(name))


def fake_teams_reset() -> None:
    with _registry_lock:
        _registry.clear()


class MemoryTeamProvider:
    """The provider interface over a ``FakeTeam`` in this process."""

    def __init__(self, team: FakeTeam) -> None:
        self.team = team
        self.calls = 0

    def _call(self, name: str) -> None:
        self.calls += 1
        self.team.count(name)

    def list_members(self) -> list[ProviderMember]:
        self._call("list_members")
        return self.team.list_members()

    def list_invites(self) -> list[ProviderInvite]:
        self._call("list_invites")
        return self.team.list_invites()

    def invite(self, email: str) -> None:
        self._call("invite")
        self.team.invite(email)

    def remove_member(self, member_id: str) -> None:
        self._call("remove_member")
        self.team.remove_member(member_id)

    def cancel_invite(self, email: str) -> None:
        self._call("cancel_invite")
        self.team.cancel_invite(email)


def memory_provider(name: str) -> MemoryTeamProvider:
    return MemoryTeamProvider(fake_team(name))


__all__ = ["FakeTeam", "MemoryTeamProvider", "TransientProviderError", "fake_team", "fake_teams_reset"]
