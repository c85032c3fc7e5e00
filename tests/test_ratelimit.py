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


# -- attempt counting without Redis (#17) ------------------------------------------------------------
@pytest.fixture
def local_attempts(settings):
    """The in-process attempt counter (no Redis), emptied before and after."""
    from leasesite import ratelimit

    settings.REDIS_URL = ""
    ratelimit._local_windows.clear()
    yield ratelimit
    ratelimit._local_windows.clear()


def test_local_attempt_windows_stay_bounded_and_a_hot_key_is_still_limited(local_attempts):
    from leasesite.ratelimit import LOCAL_ATTEMPT_KEYS_MAX, attempts_allow

    hot_answers = []
    for n in range(100_000):
        attempts_allow(key=f"redeem:client-{n}", limit=10, window_seconds=600)
        if n % 1000 == 0:  # the hot client comes back every 1,000 other clients: 100 attempts
            hot_answers.append(attempts_allow(key="redeem:hot", limit=10, window_seconds=600))
    assert len(local_attempts._local_windows) <= LOCAL_ATTEMPT_KEYS_MAX
    assert hot_answers[:10] == [True] * 10
    assert not any(hot_answers[10:]), "the hot client was forgotten while it kept trying"


def test_local_attempt_windows_expire(local_attempts):
    from leasesite.ratelimit import attempts_allow

    assert attempts_allow(key="a", limit=1, window_seconds=600)
    assert not attempts_allow(key="a", limit=1, window_seconds=600)
    started, count = local_attempts._local_windows["a"][:2]
    local_attempts._local_windows["a"] = (started - 601, count)  # its window is over
    for n in range(10):
        attempts_allow(key=f"other-{n}", limit=1, window_seconds=600)
    assert "a" not in local_attempts._local_windows  # dropped, not kept until the cap is reached
    assert attempts_allow(key="a", limit=1, window_seconds=600)
