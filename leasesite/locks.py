"""Database locks for jobs that must run once at a time across all workers.

They fail closed: any database error means "not acquired". They work the same on SQLite and
PostgreSQL: an insert that loses a race raises IntegrityError; taking over an expired lock is a
conditional UPDATE whose row count says who won.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from leasesite.models import JobLock


def lock_acquire(*, name: str, owner: str, ttl_seconds: int) -> bool:
    now = timezone.now()
    expires_at = now + timedelta(seconds=ttl_seconds)
    try:
        with transaction.atomic():
            taken_over = JobLock.objects.filter(name=name, expires_at__lt=now).update(
                owner=owner, acquired_at=now, expires_at=expires_at
            )
            if taken_over:
                return True
            try:
                with transaction.atomic():
                    JobLock.objects.create(name=name, owner=owner, acquired_at=now, expires_at=expires_at)
            except IntegrityError:
                return False
            return True
    except DatabaseError:
        return False


def lock_renew(*, name: str, owner: str, ttl_seconds: int) -> bool:
    expires_at = timezone.now() + timedelta(seconds=ttl_seconds)
    return JobLock.objects.filter(name=name, owner=owner).update(expires_at=expires_at) == 1


def lock_release(*, name: str, owner: str) -> bool:
    """Release ``owner``'s lock. The holder's connection may have broken under it (the backend
    terminated, the database restarted — the very error that ends the job): outside a transaction
    the connection is then replaced once, so the lock does not outlive the job by its whole TTL
    (a join sync killed that way kept its team unsynced for 10 minutes)."""
    try:
        return _delete_lock(name, owner)
    except DatabaseError:
        if connection.in_atomic_block:
            raise
        connection.close()
        return _delete_lock(name, owner)


def _delete_lock(name: str, owner: str) -> bool:
    deleted, _ = JobLock.objects.filter(name=name, owner=owner).delete()
    return deleted > 0


def lock_holder(*, name: str) -> JobLock | None:
    return JobLock.objects.filter(name=name, expires_at__gte=timezone.now()).first()
