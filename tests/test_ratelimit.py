"""The shared rate limiter against the real Redis (and its in-process twin)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from leasesite.ratelimit import EPOCH_KEY, LocalRateLimiter, RedisRateLimiter


def redis_client() -> redis.Redis:
    return redis.Redis.from_url("redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
def _redis_kept_its_schedules() -> None:
    redis_client().set(EPOCH_KEY, "1", px=86_400_000)


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


# -- late wake-ups (#18) -------------------------------------------------------------------------------
def most_in_one_second(stamps: list[float]) -> int:
    """The most stamps in any half-open one-second window [t, t + 1)."""
    stamps = sorted(stamps)
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


class OversleepOnce:
    """``time.sleep`` for a limiter, except that the thread named ``late`` oversleeps its first
    sleep by ``late_by`` seconds (a thread the scheduler woke far too late) and then says so."""

    def __init__(self, late_by: float) -> None:
        self.late_by = late_by
        self.late_is_sleeping = threading.Event()
        self._done = False

    def __call__(self, seconds: float) -> None:
        if threading.current_thread().name == "late" and not self._done:
            self._done = True
            self.late_is_sleeping.set()
            time.sleep(seconds + self.late_by)
            return
        time.sleep(seconds)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_late_wake_up_never_sends_on_its_stale_slot(kind):
    """Slot 1 belongs to a thread that wakes 0.6 s late; ten callers take slots 2..11 meanwhile.
    Sending on slot 1 that late would put 11 requests into one second at a limit of 10."""
    rate, jitter = 10.0, 0.05
    sleep = OversleepOnce(late_by=0.6)
    if kind == "local":
        limiter = LocalRateLimiter(rate, jitter, sleep=sleep)
    else:
        limiter = RedisRateLimiter(redis_client(), f"test:rl:{uuid.uuid4().hex}", rate, jitter, sleep=sleep)
    stamps: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        limiter.acquire()
        with lock:
            stamps.append(time.monotonic())

    take()  # slot 0
    late = threading.Thread(target=take, name="late")
    late.start()
    assert sleep.late_is_sleeping.wait(5)  # slot 1 is reserved by the late thread
    on_time = [threading.Thread(target=take) for _ in range(10)]
    for thread in on_time:
        thread.start()
    for thread in [late, *on_time]:
        thread.join()

    assert len(stamps) == 12
    assert most_in_one_second(stamps) <= rate


def test_a_late_caller_gives_its_slot_back_when_nobody_queued_behind_it():
    """At 1 request/s, a caller that woke late on the only reserved slot takes a fresh slot now
    instead of waiting a whole interval more (its unused slot is returned, not wasted)."""
    sleep = OversleepOnce(late_by=0.3)
    limiter = RedisRateLimiter(redis_client(), f"test:rl:{uuid.uuid4().hex}", 1.0, 0.05, sleep=sleep)
    limiter.acquire()  # slot 0, now
    stamps: list[float] = []

    def take() -> None:
        limiter.acquire()
        stamps.append(time.monotonic())

    started = time.monotonic()
    late = threading.Thread(target=take, name="late")
    late.start()
    late.join()
    # Slot 1 was 1.05 s ahead; the thread woke 0.3 s after it, gave it back and went at once.
    assert 1.0 <= stamps[0] - started < 1.05 + 0.3 + 0.5


@pytest.fixture
def cpu_hogs():
    """Busy-looping processes that load the host for the duration of a test."""
    import subprocess
    import sys

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    yield
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait()


def test_no_second_exceeds_the_shared_limit_on_a_loaded_host(cpu_hogs):
    """Eight threads behind two limiters (two processes' worth) take slots for ~3 s while three
    busy loops compete for the CPU; the sends never put more than the limit into one second."""
    key = f"test:rl:{uuid.uuid4().hex}"
    rate = 20.0
    # The stamps are taken after acquire() returns, and three busy loops on this host can
    # deschedule a thread for tens of milliseconds right there, outside the limiter's reach; an
    # allowance of 0.2 s (the setting deployments on loaded hosts should use) covers that, so the
    # assertion tests the limiter rather than the scheduler. The deterministic test above pins the
    # stale-slot behaviour itself.
    jitter = 0.2
    limiters = [
        RedisRateLimiter(redis_client(), key, rate, jitter),
        RedisRateLimiter(redis_client(), key, rate, jitter),
    ]
    stamps: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 3.0

    def work(limiter: RedisRateLimiter) -> None:
        while time.monotonic() < deadline:
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=work, args=(limiter,)) for limiter in limiters for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stamps) >= rate  # the test did fill windows
    assert most_in_one_second(stamps) <= rate


def test_a_caller_starved_of_cpu_stops_re_reserving_and_says_so(caplog):
    """A host so starved that the caller loses 30 ms between any two steps: every slot is stale by
    the time it is checked. After MAX_LATE_RESERVATIONS new slots the caller sends, with a
    warning, rather than waiting forever."""
    from leasesite import ratelimit

    class StarvedClock:
        now = 0.0

        def __call__(self) -> float:
            self.now += 0.03
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = StarvedClock()
    limiter = LocalRateLimiter(100.0, 0.05, clock=clock, sleep=clock.sleep)
    reservations: list[float] = []
    reserve = limiter._reserve
    limiter._reserve = lambda: reservations.append(clock.now) or reserve()  # count them
    with caplog.at_level("WARNING", logger="leasesite.ratelimit"):
        limiter.acquire()
    assert len(reservations) == ratelimit.MAX_LATE_RESERVATIONS + 1
    assert "sending anyway" in caplog.text


# -- block reservation across processes (issue 11) -----------------------------------------------------
# Each child process is a real Python process with its own limiter and threads, sharing one Redis
# key: what a set of Celery workers does. CLOCK_MONOTONIC is system-wide on Linux, so the children's
# stamps compare directly.
_BLOCK_CHILD = """
import json, sys, threading, time
import redis
from leasesite.ratelimit import RedisRateLimiter
url, key, rate, jitter, block, threads, per_thread, participant = sys.argv[1:9]
limiter = RedisRateLimiter(redis.Redis.from_url(url), key, float(rate), float(jitter),
                           block_size=int(block), participant=participant)
stamps, lock = [], threading.Lock()
def work():
    for _ in range(int(per_thread)):
        limiter.acquire()
        now = time.monotonic()
        with lock:
            stamps.append(now)
workers = [threading.Thread(target=work) for _ in range(int(threads))]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps({"stamps": stamps, "reservations": limiter.reservations, "participants": limiter.participants()}))
"""


def run_block_children(
    *, processes: int, rate: float, jitter: float, block: int | list[int], threads: int, per_thread: int
):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from django.conf import settings

    key = f"test:rl:{uuid.uuid4().hex}"
    base = Path(__file__).resolve().parent.parent
    blocks = block if isinstance(block, list) else [block] * processes
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _BLOCK_CHILD,
                settings.REDIS_URL,
                key,
                str(rate),
                str(jitter),
                str(blocks[index]),
                str(threads),
                str(per_thread),
                f"child-{index}",
            ],
            cwd=base,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(processes)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out))
    return results


def most_in_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_blocks_across_processes_never_exceed_the_limit_in_any_second_and_come_evenly_spaced():
    """Three processes × six threads reserve in blocks of 25 slots at 100/s. No 1-second window
    holds more than the limit; a block is not sent as a burst (25 grants at once) but spread one
    slot interval apart; and the Redis calls are a fraction of the grants."""
    rate, jitter, block = 100.0, 0.1, 25
    results = run_block_children(processes=3, rate=rate, jitter=jitter, block=block, threads=6, per_thread=14)
    stamps = [stamp for result in results for stamp in result["stamps"]]
    assert len(stamps) == 3 * 6 * 14
    assert most_in_one_second(stamps) <= rate
    # Slots are (1 + J) / rate = 11 ms apart and a grant is at most J late: any 50 ms holds at
    # most (0.05 + J) / interval + 1 = 14 grants; a block handed out at once would put 25 there.
    interval = (1 + jitter) / rate
    assert most_in_window(stamps, 0.05) <= int((0.05 + jitter) / interval) + 1
    reservations = sum(result["reservations"] for result in results)
    assert reservations <= len(stamps) / 4, reservations


def test_single_slot_reservations_are_still_the_default_and_share_the_same_limit():
    """A process reserving one slot per call (a QR poll, the lease engine) and one reserving
    blocks of 10, on one key: together still under the limit in every second."""
    rate = 60.0
    results = run_block_children(processes=2, rate=rate, jitter=0.1, block=[1, 10], threads=4, per_thread=12)
    stamps = [s for r in results for s in r["stamps"]]
    assert len(stamps) == 96
    assert most_in_one_second(stamps) <= rate
    assert results[0]["reservations"] >= 48 > results[1]["reservations"]


def test_participants_are_counted_across_processes():
    """Two processes reserving with a participant id each see two participants."""
    results = run_block_children(processes=2, rate=200.0, jitter=0.05, block=4, threads=2, per_thread=60)
    assert [result["participants"] for result in results] == [2, 2]


def test_pause_drops_the_slots_a_process_reserved_in_advance():
    key = f"test:rl:{uuid.uuid4().hex}"
    limiter = RedisRateLimiter(redis_client(), key, 50.0, 0.05, block_size=10)
    limiter.acquire()  # reserves a block of 10, uses one
    limiter.pause(0.5)
    started = time.monotonic()
    limiter.acquire()
    # The nine slots left of the block (within 0.2 s) were dropped: the next grant waits the pause.
    assert time.monotonic() - started >= 0.45


def test_a_block_never_reaches_past_the_reservation_horizon():
    from leasesite.ratelimit import MAX_RESERVE_AHEAD_SECONDS

    key = f"test:rl:{uuid.uuid4().hex}"
    rate = 5.0
    limiter = RedisRateLimiter(redis_client(), key, rate, 0.0, block_size=100)
    limiter.acquire()
    reserved = 1 + len(limiter._slots)
    assert reserved == int(MAX_RESERVE_AHEAD_SECONDS * rate) + 1


def test_a_participant_that_leaves_is_no_longer_counted():
    key = f"test:rl:{uuid.uuid4().hex}"
    first = RedisRateLimiter(redis_client(), key, 200.0, 0.05, participant="a")
    second = RedisRateLimiter(redis_client(), key, 200.0, 0.05, participant="b")
    first.acquire()
    second.acquire()
    assert second.participants() == 2
    second.leave()
    second.acquire()  # reserves without registering
    first._slots.clear()
    first.acquire()
    assert first.participants() == 1
    second.join()
    second._slots.clear()
    second.acquire()
    assert second.participants() == 2


def test_a_redis_that_lost_its_schedules_starts_after_the_slots_handed_out_before():
    """A restarted Redis has no TAT: slots a process reserved before (up to the horizon ahead)
    may still be sent, so the first reservation afterwards waits past them."""
    from leasesite.ratelimit import MAX_RESERVE_AHEAD_SECONDS

    key = f"test:rl:{uuid.uuid4().hex}"
    rate = 10.0
    before = RedisRateLimiter(redis_client(), key, rate, 0.0, block_size=100)
    before.acquire()
    last_before = before._slots[-1][0]  # the latest slot handed out before the "restart"
    redis_client().delete(key, EPOCH_KEY)  # what a restart without persistence leaves
    after = RedisRateLimiter(redis_client(), key, rate, 0.0)
    after.acquire()
    granted = time.monotonic()
    assert granted >= last_before + 1 / rate - 0.02
    assert granted - last_before < MAX_RESERVE_AHEAD_SECONDS  # not a needless long wait either
    assert redis_client().exists(EPOCH_KEY)
