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

**Blocks.** A Redis round trip per request costs a busy worker a good share of its CPU, so a
process may reserve its slots in small blocks: one Lua call takes ``k`` consecutive slots (the
TAT moves by ``k`` intervals), and the process hands them to its threads one by one, each thread
sleeping until its own slot. The slots stay exactly as evenly spaced as single reservations —
blocks of different processes simply follow one another on the one TAT — so the guarantee above
holds unchanged. A slot a thread reaches too late (beyond the wake-up allowance) is dropped,
never sent late; a block is never reserved beyond the reservation horizon; and ``pause`` drops
this process' unused slots (another process may still send the rest of its block: at most
``k - 1`` requests, a few tens of milliseconds of slots). Block size 1 (the default) is the old
one-call-per-request behaviour.

**Participants.** A caller that passes ``participant`` (the refresh engine does) registers
itself in a Redis sorted set beside the key on every reservation; ``participants()`` says how
many distinct ones reserved within the last ``PARTICIPANT_WINDOW_SECONDS``; ``leave()`` takes
a process out at once (it has no more work), ``join()`` counts it again. The refresh engine
divides the rate among them to size its in-flight checks.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict, deque
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
# A participant counts while it reserved within this many seconds (or five slot intervals, if longer).
PARTICIPANT_WINDOW_SECONDS = 1.0

# One key per Redis says "this Redis has kept the schedules": it is set by the first reservation
# and renewed by every other. A restarted Redis (it keeps nothing on disk) has lost it, and its
# first reservations wait out the slots the processes still hold from before (tests/faults/
# test_refresh_redis_restart.py).
EPOCH_KEY = "leasesite:ratelimit:epoch"

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


# One call reserves up to ARGV[3] consecutive slots, never past the horizon; KEYS[2], when a
# participant id is given (ARGV[4]), is the sorted set of recent participants (ARGV[5]: window, us).
_RESERVE_BLOCK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local participants = 0
if ARGV[4] ~= '' then
  local window = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  redis.call('PEXPIRE', KEYS[2], math.floor(window / 1000) + 1000)
  participants = redis.call('ZCARD', KEYS[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local interval = tonumber(ARGV[1])
local horizon = math.max(tonumber(ARGV[2]), interval)
-- KEYS[3] (EPOCH_KEY) outlives idle spells; missing, this Redis has lost the schedules
-- (restarted, flushed): slots reserved from its predecessor may still be ahead, up to the
-- horizon, so the new schedule starts after them.
if redis.call('SET', KEYS[3], '1', 'PX', 86400000, 'NX') then
  tat = math.max(tat, now + horizon + interval)
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
else
  redis.call('PEXPIRE', KEYS[3], 86400000)
end
local wait = tat - now
if wait > horizon then
  return {0, string.format('%.0f', wait - horizon), '', participants}
end
local count = math.min(tonumber(ARGV[3]), math.floor((horizon - wait) / interval) + 1)
if count < 1 then count = 1 end
local new_tat = tat + interval * count
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
return {count, string.format('%.0f', wait), string.format('%.0f', new_tat), participants}
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
    injectable for tests; slots themselves are computed on Redis' clock.

    ``block_size`` slots are reserved per Redis call (settable while running, see the module
    docstring); ``participant`` registers this limiter as one of the callers sharing the rate."""

    def __init__(
        self,
        redis_client: redis.Redis,
        key: str,
        rate: float,
        jitter: float = 0.0,
        *,
        block_size: int = 1,
        participant: str = "",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        # Rounded up: rounding down would let rate + 1 slots fit into one second.
        self._interval_us = math.ceil(slot_interval_seconds(rate, jitter) * 1_000_000)
        self._interval = self._interval_us / 1_000_000
        self._tolerance = _late_tolerance(jitter)
        self._clock = clock
        self._sleep = sleep
        self._key = key
        self._participants_key = f"{key}:participants"
        self._epoch_key = EPOCH_KEY
        self._participant = participant
        self._registered = bool(participant)
        self._window_us = int(max(PARTICIPANT_WINDOW_SECONDS, 5 * self._interval) * 1_000_000)
        self.block_size = max(1, int(block_size))
        self._participants = 1
        self._fastest_round_trip = math.inf
        # Reserved slots not handed out yet: (local send time, local time lateness is measured
        # from, the slot's TAT end on Redis' clock, last slot of its block?). One reservation at
        # a time.
        self._slots: deque[tuple[float, float, int, bool]] = deque()
        self._lock = threading.Lock()
        self._reserve_lock = threading.Lock()
        self._participants_client = redis_client
        self._reserve = redis_client.register_script(_RESERVE_BLOCK_LUA)
        self._give_back = redis_client.register_script(_GIVE_BACK_LUA)
        self._pause = redis_client.register_script(_PAUSE_LUA)
        self.reservations = 0  # Redis calls made to reserve (for benchmarks and tests)
        self.dropped = 0  # slots dropped because the caller reached them too late

    def participants(self) -> int:
        """Distinct participants that reserved within the window, as of our last reservation."""
        return max(1, self._participants)

    def join(self) -> None:
        """Count this process among the participants again (from its next reservation on)."""
        self._registered = bool(self._participant)

    def leave(self) -> None:
        """Stop counting this process at once (it has no more work to take): the others, seeing
        fewer participants at their next reservation, size up for the rate left to them."""
        if self._participant and self._registered:
            self._registered = False
            self._participants_client.zrem(self._participants_key, self._participant)

    def _next_slot(self) -> tuple[float, float, int, bool]:
        """Pop this process' next reserved slot, reserving a block when there is none."""
        while True:
            with self._lock:
                if self._slots:
                    return self._slots.popleft()
            with self._reserve_lock:
                with self._lock:
                    if self._slots:  # another thread reserved meanwhile
                        continue
                self._reserve_block()

    def _reserve_block(self) -> None:
        horizon_us = int(MAX_RESERVE_AHEAD_SECONDS * 1_000_000)
        while True:
            asked_at = self._clock()
            count, micros, block_end, participants = self._reserve(
                keys=[self._key, self._participants_key, self._epoch_key],
                args=[
                    self._interval_us,
                    horizon_us,
                    self.block_size,
                    self._participant if self._registered else "",
                    self._window_us,
                ],
            )
            answered_at = self._clock()
            self.reservations += 1
            if self._registered:
                self._participants = int(participants)
            count, wait = int(count), int(micros) / 1_000_000
            if count < 1:
                self._sleep(wait)
                continue
            # Redis set the first slot at ``wait`` after some instant between asking and the
            # answer: sending ``wait`` after the answer is never early. The fastest round trip
            # seen so far is the constant part (it delays every request alike, which keeps their
            # spacing); anything beyond it — a stall before the answer was read, a late wake-up —
            # counts as lateness.
            self._fastest_round_trip = min(self._fastest_round_trip, answered_at - asked_at)
            send = answered_at + wait
            reference = asked_at + self._fastest_round_trip + wait
            end, interval, interval_us = int(block_end), self._interval, self._interval_us
            slots = [
                (
                    send + index * interval,
                    reference + index * interval,
                    end - (count - 1 - index) * interval_us,
                    index == count - 1,
                )
                for index in range(count)
            ]
            with self._lock:
                self._slots.extend(slots)
            return

    def acquire(self) -> float:
        started = self._clock()
        late_reservations = 0
        while True:
            send_at, reference, slot_end, last_of_block = self._next_slot()
            wait = send_at - self._clock()
            if wait > 0:
                self._sleep(wait)
            late_by = self._clock() - reference
            if self._tolerance is None or late_by <= self._tolerance:
                return self._clock() - started
            if late_reservations == MAX_LATE_RESERVATIONS:
                _warn_still_late(late_by)
                return self._clock() - started
            late_reservations += 1
            self.dropped += 1
            # Never sent late: drop the slot. The last slot of a block is given back when nobody
            # reserved after it (the TAT is still its end), so the next reservation starts now.
            if last_of_block:
                self._give_back(keys=[self._key], args=[slot_end, self._interval_us])

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._slots.clear()  # reserved before the upstream said "slow down"
        self._pause(keys=[self._key], args=[int(seconds * 1_000_000)])


@lru_cache(maxsize=16)
def _local_limiter(name: str, rate: float, jitter: float) -> LocalRateLimiter:
    return LocalRateLimiter(rate, jitter)


_shared_limiters: dict[tuple, RedisRateLimiter] = {}
_shared_limiters_lock = threading.Lock()


def _participant_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def get_rate_limiter(*, name: str, rate: float, jitter: float | None = None, participant: bool = False) -> RateLimiter:
    """The limiter for one upstream. Shared through Redis when ``REDIS_URL`` is set.

    ``participant=True`` (the refresh engine) returns this process' one limiter that reserves in
    blocks and counts itself among the participants; it is kept per process (created again after
    a fork), so reserved slots carry over from one batch to the next. Other callers get a fresh
    limiter reserving one slot per call.
    """
    if jitter is None:
        jitter = settings.RATE_LIMIT_JITTER_ALLOWANCE
    if settings.REDIS_URL:
        from leasesite.redis_client import get_redis

        key = f"leasesite:ratelimit:{name}"
        if not participant:
            return RedisRateLimiter(get_redis(), key, rate, jitter)
        cache_key = (settings.REDIS_URL, key, rate, jitter, os.getpid())
        with _shared_limiters_lock:
            limiter = _shared_limiters.get(cache_key)
            if limiter is None:
                if len(_shared_limiters) >= 16:
                    _shared_limiters.clear()
                limiter = RedisRateLimiter(get_redis(), key, rate, jitter, participant=_participant_id())
                _shared_limiters[cache_key] = limiter
            return limiter
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
