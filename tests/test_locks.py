from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from leasesite.locks import lock_acquire, lock_holder, lock_release, lock_renew
from leasesite.models import JobLock

pytestmark = pytest.mark.django_db


def test_acquire_release_cycle():
    assert lock_acquire(name="job", owner="a", ttl_seconds=60)
    assert not lock_acquire(name="job", owner="b", ttl_seconds=60)
    assert lock_holder(name="job").owner == "a"
    assert not lock_release(name="job", owner="b")
    assert lock_release(name="job", owner="a")
    assert lock_acquire(name="job", owner="b", ttl_seconds=60)


def test_expired_lock_can_be_taken_and_old_owner_cannot_renew():
    assert lock_acquire(name="job", owner="a", ttl_seconds=60)
    JobLock.objects.filter(name="job").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert lock_holder(name="job") is None
    assert lock_acquire(name="job", owner="b", ttl_seconds=60)
    assert not lock_renew(name="job", owner="a", ttl_seconds=60)
    assert lock_renew(name="job", owner="b", ttl_seconds=60)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("expired_first", [False, True])
def test_concurrent_acquire_has_exactly_one_winner(expired_first):
    if expired_first:
        JobLock.objects.create(
            name="job", owner="dead", acquired_at=timezone.now(), expires_at=timezone.now() - timedelta(seconds=5)
        )
    barrier = threading.Barrier(4)
    wins: list[str] = []

    def contend(owner: str) -> None:
        barrier.wait()
        try:
            if lock_acquire(name="job", owner=owner, ttl_seconds=60):
                wins.append(owner)
        finally:
            connection.close()

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert JobLock.objects.get(name="job").owner == wins[0]
