"""One request rate shared by every worker process: GCRA slot reservation.

Each caller reserves the next free slot ("theoretical arrival time", TAT) and sleeps until it.
With Redis the TAT lives in one key updated by a Lua script using Redis' own clock, so any number
of processes on any number of hosts together stay under ``rate`` requests per second. Without
Redis (embedded mode) the same algorithm runs in-process.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Protocol

from django.conf import settings

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


class LocalRateLimiter:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._interval = 1.0 / rate
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
    def __init__(self, redis_client, key: str, rate: float) -> None:
        self.rate = rate
        self._interval_us = int(1_000_000 / rate)
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
def _local_limiter(name: str, rate: float) -> LocalRateLimiter:
    return LocalRateLimiter(rate)


def get_rate_limiter(*, name: str, rate: float) -> RateLimiter:
    """The limiter for one upstream. Shared through Redis when ``REDIS_URL`` is set."""
    if settings.REDIS_URL:
        from leasesite.redis_client import get_redis

        return RedisRateLimiter(get_redis(), f"leasesite:ratelimit:{name}", rate)
    return _local_limiter(name, rate)
