"""What an operator may do to one lease from its page, derived from the state machine.

An operation is offered only when the lease's status allows its transition in
``ALLOWED_TRANSITIONS`` (and the service's own precondition holds) and the user has its
permission. Dangerous operations go through a confirmation page first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.utils.translation import gettext_lazy as _

from leases.models import ALLOWED_TRANSITIONS, NON_FINAL_STATUSES, LeaseStatus, MemberLease


@dataclass(frozen=True)
class Operation:
    name: str
    label: Any
    from_statuses: frozenset[str]
    to_status: str
    permission: str  # "app_label.codename"
    dangerous: bool
    explanation: Any  # what will change, for the confirmation page


def _run_retry(lease_id: int, actor_id: int | None) -> str:
    from leases.services.operator import lease_retry

    lease_retry(lease_id=lease_id, actor_id=actor_id)
    return str(_("Transfer retried: a worker moves the lease to a healthy team now."))


def _run_reset(lease_id: int, actor_id: int | None) -> str:
    from leases.services.operator import lease_reset

    lease_reset(lease_id=lease_id, actor_id=actor_id)
    return str(_("Reset to active: the lease stays in its team until its term ends."))


def _run_force_transfer(lease_id: int, actor_id: int | None) -> str:
    from leases.services.operator import lease_force_transfer

    lease_force_transfer(lease_id=lease_id, actor_id=actor_id)
    return str(_("Transfer started: a worker invites the member to the next team, then removes them here."))


def _run_cancel(lease_id: int, actor_id: int | None) -> str:
    from leases.services.cancellation import lease_cancel

    outcome = lease_cancel(
        lease_id=lease_id, actor_id=actor_id, reason=str(_("cancelled in the admin")), free_seats_later=True
    )
    if not outcome.cancelled:
        return str(_("A worker is busy with this lease: it cancels it as soon as its current step ends."))
    return str(_("Cancelled; a worker frees its seat at the provider now (see the history)."))


RUNNERS: dict[str, Callable[[int, int | None], str]] = {
    "retry": _run_retry,
    "reset": _run_reset,
    "force_transfer": _run_force_transfer,
    "cancel": _run_cancel,
}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "retry",
        _("Retry the transfer"),
        frozenset({LeaseStatus.FAILED}),
        LeaseStatus.TRANSFERRING,
        "leases.change_memberlease",
        False,
        _("The lease goes back to transferring with a fresh attempt budget; a worker moves it at once."),
    ),
    Operation(
        "reset",
        _("Reset to active"),
        frozenset({LeaseStatus.FAILED}),
        LeaseStatus.ACTIVE,
        "leases.change_memberlease",
        False,
        _("Use when you checked the member is seated in the lease's team: it stays there until its term ends."),
    ),
    Operation(
        "force_transfer",
        _("Force transfer now"),
        frozenset({LeaseStatus.ACTIVE}),
        LeaseStatus.TRANSFERRING,
        "leases.can_force_transfer",
        True,
        _("The member is invited to another team now and then removed from the current one, before the term ends."),
    ),
    Operation(
        "cancel",
        _("Cancel the lease"),
        frozenset(NON_FINAL_STATUSES),
        LeaseStatus.CANCELLED,
        "leases.can_cancel_lease",
        True,
        _("The lease ends for good and its seat is freed at the provider. This cannot be undone."),
    ),
)
BY_NAME = {operation.name: operation for operation in OPERATIONS}


def operation_allowed(operation: Operation, status: str) -> bool:
    return status in operation.from_statuses and operation.to_status in ALLOWED_TRANSITIONS.get(status, ())


def operations_for(lease: MemberLease, user: Any) -> list[Operation]:
    """The operations this user may start on this lease now, in a stable order."""
    return [op for op in OPERATIONS if operation_allowed(op, lease.status) and user.has_perm(op.permission)]


def operation_run(name: str, *, lease_id: int, actor_id: int | None) -> str:
    """Run one operation through its service; the message to show. Raises ``LeaseError``."""
    return RUNNERS[name](lease_id, actor_id)
