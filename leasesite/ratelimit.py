"""One request rate shared by every worker process: GCRA slot reservation.

Each caller reserves the next free slot ("theoretical arrival time", TAT) and sleeps until it.
With Redis the TAT lives in one key updated by a Lua script using Redis' own clock, so any number
of processes on any number of hosts together stay under ``rate`` requests per second. Without
Redis (embedded mode) the same algorithm runs in-process.

Slots are spaced ``(1 + jitter) / rate`` apart, not ``1 / rate``: a request leaves (and arrives)
a little after its slot — thread scheduling, the GIL, a loaded host — and if one request of a
window is late while the one ``rate`` slots later is on time, ``rate + 1`` requests land within one
second at the upstream. Spacing ``rate`` intervals over ``1 + jitter`` seconds keeps every
one-second window at the upstream within the limit as long as the lateness stays under
``jitter`` seconds (measured in benchmarks/: up to ~45 ms on a loaded 2-core host).

Lateness beyond that is not left to chance: a caller that wakes up more than half the allowance
after its slot (a thread the scheduler woke late, a stalled process) does not send on that stale
slot. It gives the slot back (if nobody reserved after it, the next slot is free again at once)
and reserves a new one. The other half of the allowance is left for the way from ``acquire``'s
return to the upstream (building and writing the request). With ``jitter`` 0 there is no
allowance and no such check (slots exactly ``1 / rate`` apart, best effort).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from django.conf import settings

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

# Reserve at most this far ahead; beyond it callers sleep and ask again, so an aborted run does
# not leave a long queue of reserved-but-unused slots.
MAX_RESERVE_AHEAD_SECONDS = 2.0
# The share of the jitter allowance a caller may spend waking up after its slot (see above).
WAKE_SHARE_OF_JITTER = 0.5
# A caller that keeps waking up late (a host starved of CPU for seconds) stops re-reserving after
# this many tries and sends, with a warning, rather than waiting forever.
MAX_LATE_RESERVATIONS = 10

_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
local interval = tonumber(ARGV[1])
local horizon = math.max(tonumber(ARGV[2]), interval)
if wait > horizon then
  return {0, string.format('%.0f', wait - horizon), ''}
end
local new_tat = string.format('%.0f', tat + interval)
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((tat + interval - now) / 1000) + 1000)
return {1, string.format('%.0f', wait), new_tat}
"""

# Give a reserved slot back: only when nobody reserved after it (the TAT is still the one this
# reservation set), so no other caller's slot moves.
_GIVE_BACK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], string.format('%.0f', tonumber(ARGV[1]) - tonumber(ARGV[2])), 'KEEPTTL')
  return 1
end
return 0
"""

_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local target = now + tonumber(ARGV[1])
if target > tat then
  redis.call('SET', KEYS[1], string.format('%.0f', target), 'PX',
             math.floor((target - now) / 1000) + 1000)
end
return 1
"""


class RateLimiter(Protocol):
    rate: float

    def acquire(self) -> float:
        """Block until this caller may send one request; return the seconds waited."""

    def pause(self, seconds: float) -> None:
        """Push every caller's next slot at least ``seconds`` into the future (upstream said 429)."""


def slot_interval_seconds(rate: float, jitter: float) -> float:
    return (1.0 + jitter) / rate


def _late_tolerance(jitter: float) -> float | None:
    """Seconds a caller may wake up after its slot and still send on it; None: no check."""
    return jitter * WAKE_SHARE_OF_JITTER if jitter > 0 else None


def _warn_still_late(late_by: float) -> None:
    logger.warning(
        "rate limiter: woke up %.3f s after the slot %d times in a row; sending anyway "
        "(the host is starved of CPU, or RATE_LIMIT_JITTER_ALLOWANCE is too small for it)",
        late_by,
        MAX_LATE_RESERVATIONS + 1,
    )


class LocalRateLimiter:
    """The in-process limiter. ``clock`` and ``sleep`` are injectable for tests."""

    def __init__(
        self,
        rate: float,
        jitter: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self._interval = slot_interval_seconds(rate, jitter)
        self._tolerance = _late_tolerance(jitter)
        self._clock = clock
        self._sleep = sleep
        self._tat = 0.0
        self._lock = threading.Lock()

    def _reserve(self) -> float:
        """Reserve the next slot (within the horizon) and return it, on ``clock``'s time."""
        while True:
            with self._lock:
                now = self._clock()
                slot = max(self._tat, now)
                wait = slot - now
                horizon = max(MAX_RESERVE_AHEAD_SECONDS, self._interval)
                if wait <= horizon:
                    self._tat = slot + self._interval
                    return slot
            self._sleep(wait - horizon)

    def acquire(self) -> float:
        started = self._clock()
        late_reservations = 0
        while True:
            slot = self._reserve()
            wait = slot - self._clock()
            if wait > 0:
                self._sleep(wait)
            late_by = self._clock() - slot
            if self._tolerance is None or late_by <= self._tolerance:
                return self._clock() - started
            if late_reservations == MAX_LATE_RESERVATIONS:
                _warn_still_late(late_by)
                return self._clock() - started
            late_reservations += 1
            with self._lock:
                if self._tat == slot + self._interval:  # nobody reserved after it: give it back
                    self._tat = slot

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._tat = max(self._tat, self._clock() + seconds)


class RedisRateLimiter:
    """The shared limiter. ``clock`` (this host's, for measuring lateness) and ``sleep`` are
    injectable for tests; slots themselves are computed on Redis' clock."""

    def __init__(
        self,
        redis_client: redis.Redis,
        key: str,
        rate: float,
        jitter: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        # Rounded up: rounding down would let rate + 1 slots fit into one second.
        self._interval_us = math.ceil(slot_interval_seconds(rate, jitter) * 1_000_000)
        self._tolerance = _late_tolerance(jitter)
        self._clock = clock
        self._sleep = sleep
        self._key = key
        self._fastest_round_trip = math.inf
        self._reserve = redis_client.register_script(_RESERVE_LUA)
        self._give_back = redis_client.register_script(_GIVE_BACK_LUA)
        self._pause = redis_client.register_script(_PAUSE_LUA)

    def acquire(self) -> float:
        started = self._clock()
        horizon_us = int(MAX_RESERVE_AHEAD_SECONDS * 1_000_000)
        late_reservations = 0
        while True:
            asked_at = self._clock()
            reserved, micros, slot_end = self._reserve(keys=[self._key], args=[self._interval_us, horizon_us])
            answered_at = self._clock()
            wait = int(micros) / 1_000_000
            if int(reserved) != 1:
                self._sleep(wait)
                continue
            if wait > 0:
                self._sleep(wait)
            # Redis set the slot at ``wait`` after some instant between asking and the answer. The
            # fastest round trip seen so far is the constant part (it delays every request alike,
            # which keeps their spacing); anything beyond it — a stall before the answer was read,
            # a late wake-up — counts as lateness.
            round_trip = answered_at - asked_at
            self._fastest_round_trip = min(self._fastest_round_trip, round_trip)
            late_by = self._clock() - asked_at - wait - self._fastest_round_trip
            if self._tolerance is None or late_by <= self._tolerance:
                return self._clock() - started
            if late_reservations == MAX_LATE_RESERVATIONS:
                _warn_still_late(late_by)
                return self._clock() - started
            late_reservations += 1
            self._give_back(keys=[self._key], args=[slot_end, self._interval_us])

    def pause(self, seconds: float) -> None:
        self._pause(keys=[self._key], args=[int(seconds * 1_000_000)])


@lru_cache(maxsize=16)
def _local_limiter(name: str, rate: float, jitter: float) -> LocalRateLimiter:
    return LocalRateLimiter(rate, jitter)


def get_rate_limiter(*, name: str, rate: float, jitter: float | None = None) -> RateLimiter:
    """The limiter for one upstream. Shared through Redis when ``REDIS_URL`` is set."""
    if jitter is None:
        jitter = settings.RATE_LIMIT_JITTER_ALLOWANCE
    if settings.REDIS_URL:
        from leasesite.redis_client import get_redis

        return RedisRateLimiter(get_redis(), f"leasesite:ratelimit:{name}", rate, jitter)
    return _local_limiter(name, rate, jitter)


# -- attempt counting (abuse protection) --------------------------------------------------------------
# Without Redis the windows live in this process. They are kept in least-recently-used order and
# bounded: windows that are over are dropped as they reach the front, and beyond
# LOCAL_ATTEMPT_KEYS_MAX keys the least recently seen client is forgotten. Forgetting fails open
# (that client starts a fresh window), like a Redis outage does: a flood of distinct addresses must
# not grow the process without bound nor lock everyone out, while a client that keeps trying stays
# at the recent end and stays counted.
LOCAL_ATTEMPT_KEYS_MAX = 10_000
_local_windows: OrderedDict[str, tuple[float, int]] = OrderedDict()
_local_windows_lock = threading.Lock()


def attempts_allow(*, key: str, limit: int, window_seconds: int) -> bool:
    """Count one attempt for ``key``; False once more than ``limit`` fell in the current window.

    A fixed window in Redis (INCR + EXPIRE, shared by every web process) or, without Redis, in
    this process (bounded, see above). Redis being down fails open: a login-free public form must
    not go dark because the limiter's store did.
    """
    if settings.REDIS_URL:
        import redis as redis_lib

        from leasesite.redis_client import get_redis

        name = f"leasesite:attempts:{key}"
        try:
            pipe = get_redis().pipeline()
            pipe.incr(name)
            pipe.expire(name, window_seconds, nx=True)
            count, _ = pipe.execute()
        except redis_lib.RedisError:
            return True
        return int(count) <= limit
    now = time.monotonic()
    with _local_windows_lock:
        started, count = _local_windows.get(key, (now, 0))
        if now - started >= window_seconds:
            started, count = now, 0
        _local_windows[key] = (started, count + 1)
        _local_windows.move_to_end(key)
        # The callers share one window length, so an entry at the front that is over can go.
        while _local_windows:
            oldest_key, (oldest_started, _count) = next(iter(_local_windows.items()))
            if oldest_key == key or now - oldest_started < window_seconds:
                break
            del _local_windows[oldest_key]
        while len(_local_windows) > LOCAL_ATTEMPT_KEYS_MAX:
            _local_windows.popitem(last=False)
        return count + 1 <= limit
