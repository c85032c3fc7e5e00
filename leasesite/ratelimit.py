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
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from django.conf import settings

if TYPE_CHECKING:
    import redis

# Reserve at most this far ahead; beyond it callers sleep and ask again, so an aborted run does
# not leave a long queue of reserved-but-unused slots.
MAX_RESERVE_AHEAD_SECONDS = 2.0

_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
local interval = tonumber(ARGV[1])
local horizon = math.max(tonumber(ARGV[2]), interval)
if wait > horizon then
  return {0, string.format('%.0f', wait - horizon)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.floor((new_tat - now) / 1000) + 1000)
return {1, string.format('%.0f', wait)}
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


class LocalRateLimiter:
    def __init__(self, rate: float, jitter: float = 0.0) -> None:
        self.rate = rate
        self._interval = slot_interval_seconds(rate, jitter)
        self._tat = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        started = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                tat = max(self._tat, now)
                wait = tat - now
                horizon = max(MAX_RESERVE_AHEAD_SECONDS, self._interval)
                if wait <= horizon:
                    self._tat = tat + self._interval
                    break
            time.sleep(wait - horizon)
        if wait > 0:
            time.sleep(wait)
        return time.monotonic() - started

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._tat = max(self._tat, time.monotonic() + seconds)


class RedisRateLimiter:
    def __init__(self, redis_client: redis.Redis, key: str, rate: float, jitter: float = 0.0) -> None:
        self.rate = rate
        # Rounded up: rounding down would let rate + 1 slots fit into one second.
        self._interval_us = math.ceil(slot_interval_seconds(rate, jitter) * 1_000_000)
        self._key = key
        self._reserve = redis_client.register_script(_RESERVE_LUA)
        self._pause = redis_client.register_script(_PAUSE_LUA)

    def acquire(self) -> float:
        started = time.monotonic()
        horizon_us = int(MAX_RESERVE_AHEAD_SECONDS * 1_000_000)
        while True:
            reserved, micros = self._reserve(keys=[self._key], args=[self._interval_us, horizon_us])
            micros = int(micros)
            if int(reserved) == 1:
                if micros > 0:
                    time.sleep(micros / 1_000_000)
                return time.monotonic() - started
            time.sleep(micros / 1_000_000)

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
