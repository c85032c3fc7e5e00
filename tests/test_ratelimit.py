"""The shared rate limiter against the real Redis (and its in-process twin)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from leasesite.ratelimit import LocalRateLimiter, RedisRateLimiter


def redis_client() -> redis.Redis:
    return redis.Redis.from_url("redis://127.0.0.1:6379/15")


def hammer(limiters: list, per_thread: int, threads_per_limiter: int) -> tuple[float, list[float]]:
    stamps: list[float] = []
    lock = threading.Lock()

    def work(limiter) -> None:
        for _ in range(per_thread):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=work, args=(lim,)) for lim in limiters for _ in range(threads_per_limiter)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return started, sorted(stamps)


def assert_never_ahead_of_schedule(started: float, stamps: list[float], rate: float) -> None:
    """The k-th grant (0-based) can never come before started + k / rate (small clock slack)."""
    for k, stamp in enumerate(stamps):
        assert stamp - started >= k / rate - 0.02, f"grant {k} came {k / rate - (stamp - started):.3f}s early"


def test_two_processes_worth_of_limiters_share_one_rate():
    key = f"test:rl:{uuid.uuid4().hex}"
    rate = 40.0
    limiters = [RedisRateLimiter(redis_client(), key, rate), RedisRateLimiter(redis_client(), key, rate)]
    started, stamps = hammer(limiters, per_thread=5, threads_per_limiter=4)
    assert len(stamps) == 40
    assert_never_ahead_of_schedule(started, stamps, rate)


def test_pause_pushes_every_caller_back():
    key = f"test:rl:{uuid.uuid4().hex}"
    first = RedisRateLimiter(redis_client(), key, 100.0)
    other = RedisRateLimiter(redis_client(), key, 100.0)
    first.acquire()
    first.pause(0.4)
    started = time.monotonic()
    other.acquire()
    assert time.monotonic() - started >= 0.35


def test_redis_limiter_key_expires():
    key = f"test:rl:{uuid.uuid4().hex}"
    RedisRateLimiter(redis_client(), key, 10.0).acquire()
    ttl = redis_client().pttl(key)
    assert 0 < ttl <= 1200


def test_slow_rates_queue_callers_beyond_the_reservation_horizon():
    key = f"test:rl:{uuid.uuid4().hex}"
    rate = 2.0  # 0.5 s apart; 6 callers reach past the 2 s horizon
    started, stamps = hammer([RedisRateLimiter(redis_client(), key, rate)], per_thread=1, threads_per_limiter=6)
    assert_never_ahead_of_schedule(started, stamps, rate)


@pytest.mark.parametrize("rate", [50.0, 3.0])
def test_local_limiter(rate):
    limiter = LocalRateLimiter(rate)
    started, stamps = hammer([limiter], per_thread=2, threads_per_limiter=4)
    assert_never_ahead_of_schedule(started, stamps, rate)
    limiter.pause(0.3)
    paused_at = time.monotonic()
    limiter.acquire()
    assert time.monotonic() - paused_at >= 0.28


def test_slots_leave_room_for_jitter_so_no_second_holds_more_than_rate():
    """With a jitter allowance J, rate + 1 grants always span at least 1 + J seconds."""
    key = f"test:rl:{uuid.uuid4().hex}"
    rate, jitter = 20.0, 0.05
    limiter = RedisRateLimiter(redis_client(), key, rate, jitter)
    started, stamps = hammer([limiter], per_thread=6, threads_per_limiter=4)
    # Grant k never comes before k * (1 + J) / rate: rate + 1 grants span at least 1 + J seconds.
    assert_never_ahead_of_schedule(started, stamps, rate / (1 + jitter))


def test_interval_is_rounded_up():
    limiter = RedisRateLimiter(redis_client(), f"test:rl:{uuid.uuid4().hex}", 3.0)
    assert limiter._interval_us * 3 >= 1_000_000
