"""Fault family 5: "slow down" from both upstreams — HTTP 429 with ``Retry-After`` in seconds and as
an HTTP-date, and the 报名工具 API's ``请求过于频繁`` — through real workers.

The wait is honoured (the retry arrives no sooner than it was told: a lower bound, which load can
only make longer), it is capped so that no single wait comes near the broker's visibility timeout,
the run's lock stays held — and renewed — throughout (a run started meanwhile is refused), and no
token is deleted. On the lease side the same for a team provider's 429 during a join sync, whose
per-team lock keeps a second sync out while the first waits.
"""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from leases.models import LeaseStatus
from leases.providers.base import ProviderError
from leases.providers.http import MAX_RETRY_AFTER_SECONDS as PROVIDER_MAX_WAIT
from leases.services.sync import team_sync_joins
from leasesite.models import JobLock
from tests.conftest import json_answer, ok
from tests.faults import processes
from tests.faults._h4_support import (
    fingerprints,
    latest_run,
    limiter_pause_seconds,
    make_tokens,
    wait_run_final,
    worker_env,
    workers_fixture,  # noqa: F401 - the fixture
)
from tokens.clients import MAX_RETRY_AFTER_SECONDS as BAOMING_MAX_WAIT
from tokens.models import RunStatus
from tokens.services.runs import REFRESH_LOCK_NAME
from tokens.tasks import refresh_tokens

pytestmark = pytest.mark.django_db(transaction=True)

VISIBILITY_TIMEOUT = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600)


def too_many(retry_after: str | None = None):
    return json_answer({}, status=429, headers={"Retry-After": retry_after} if retry_after else None)


frequent = json_answer({"sta": -1, "msg": "请求过于频繁，请稍后重试", "data": None})


def http_date(seconds_from_now: float) -> str:
    return formatdate(time.time() + seconds_from_now, usegmt=True)


def arrivals(upstream, token: str) -> list[float]:
    return [r["at"] for r in upstream.requests if r["token"] == token]


def one_checker(upstream, workers) -> None:
    """One worker checking one token at a time: the order of the requests is the order of the run."""
    workers.start(1, worker_env(upstream.url, BAOMING_CONCURRENCY="1", BAOMING_BATCH_SIZE="10"))


def test_retry_after_seconds_is_waited_with_the_lock_held_and_renewed(upstream, workers):
    """Told to wait 12 s — longer than the 10 s lock: the lock must be renewed while waiting."""
    tokens = make_tokens(3)
    before = fingerprints()
    upstream.answers[tokens[0].token] = [too_many("12"), ok]
    one_checker(upstream, workers)
    refresh_tokens.delay()
    processes.wait_for(lambda: len(upstream.requests) == 1, timeout=60, what="the 429")
    run = latest_run()
    refusals = 0
    while len(upstream.requests) == 1:  # the whole wait: the lock is held, a second run refused
        lock = JobLock.objects.get(name=REFRESH_LOCK_NAME)
        assert lock.owner == run.lock_owner and lock.expires_at > timezone.now()
        assert refresh_tokens.apply().result is None  # refused: another run is in progress
        refusals += 1
        time.sleep(0.5)  # pacing of the poll only; nothing is asserted on time here
        assert refusals < 200, "the retry never came"
    run = wait_run_final(timeout=60)
    first, retry = arrivals(upstream, tokens[0].token)
    assert retry - first >= 12.0
    assert all(r["at"] >= first + 12.0 for r in upstream.requests[1:])  # every worker waited
    assert (run.status, run.ok, run.rate_limited, run.deleted) == (RunStatus.SUCCEEDED, 3, 1, 0)
    assert refusals >= 10 and fingerprints() == before
    assert latest_run().pk == run.pk  # no second run was started meanwhile


def test_retry_after_as_http_date_and_the_busy_message_are_waited(upstream, workers):
    tokens = make_tokens(3)
    upstream.answers[tokens[0].token] = [lambda: too_many(http_date(3))(), ok]
    upstream.answers[tokens[1].token] = [frequent, ok]  # no Retry-After: backs off 2 s first
    one_checker(upstream, workers)
    refresh_tokens.delay()
    run = wait_run_final(timeout=60)
    assert (run.status, run.ok, run.rate_limited, run.deleted) == (RunStatus.SUCCEEDED, 3, 2, 0)
    a_first, a_retry = arrivals(upstream, tokens[0].token)
    b_first, b_retry = arrivals(upstream, tokens[1].token)
    assert a_retry - a_first >= 2.0  # the date has whole seconds: at least 2 of the 3 remain
    assert b_retry - b_first >= 2.0
    assert len(fingerprints()) == 3


@pytest.mark.parametrize("retry_after", ["86400", "date-in-a-day"])
def test_a_huge_retry_after_is_capped_well_inside_the_visibility_timeout(upstream, workers, retry_after):
    tokens = make_tokens(2)
    header = http_date(86400) if retry_after == "date-in-a-day" else retry_after
    upstream.answers[tokens[0].token] = too_many(header)
    one_checker(upstream, workers)
    limiter = redis.Redis.from_url(settings.REDIS_URL)
    refresh_tokens.delay()
    processes.wait_for(lambda: upstream.requests, timeout=60, what="the 429")
    waited = processes.wait_for(lambda: limiter_pause_seconds(limiter), timeout=10, what="the limiter paused")
    assert BAOMING_MAX_WAIT - 30 < waited <= BAOMING_MAX_WAIT < VISIBILITY_TIMEOUT
    run = latest_run()
    assert JobLock.objects.get(name=REFRESH_LOCK_NAME).owner == run.lock_owner
    assert refresh_tokens.apply().result is None
    workers.kill9()  # it would wait the 300 s out
    assert len(fingerprints()) == 2 and run.deleted == 0


# -- the team provider ----------------------------------------------------------------------------------
def _throttled_team(provider, make_team, make_lease, header: str, seconds: float):
    team = make_team("alpha")
    lease = make_lease(team, status=LeaseStatus.PENDING)
    fake = provider.state.team("alpha")
    fake.invite(lease.email)
    fake.accept(lease.email)
    error = ProviderError("slow down", status=429, retry_after=seconds)
    error.retry_after_header = header  # type: ignore[attr-defined]
    fake.fail_next.append(error)
    return team, lease


def _members_calls(provider) -> list[float]:
    return [t for (team, method, path), t in zip(provider.state.requests, provider.state.request_times, strict=True)
            if team == "alpha" and method == "GET" and path == "members"]  # fmt: skip


def test_provider_retry_after_seconds_is_waited_by_a_worker_holding_the_team_lock(
    provider, make_team, make_lease, workers
):
    from leases.tasks import sync_joins

    team, lease = _throttled_team(provider, make_team, make_lease, "4", 4)
    workers.start(1, worker_env("http://127.0.0.1:9"))
    sync_joins.delay(team_id=team.pk)
    processes.wait_for(lambda: len(_members_calls(provider)) == 1, timeout=60, what="the provider's 429")
    second = team_sync_joins(team=team)  # meanwhile, in this process: the team's lock is held
    assert second.skipped == "another sync of this team is running"
    assert len(_members_calls(provider)) == 1  # the refused sync asked nothing
    processes.wait_for(
        lambda: type(lease).objects.get(pk=lease.pk).status == LeaseStatus.ACTIVE, timeout=60, what="the join"
    )
    first, retry = _members_calls(provider)
    assert retry - first >= 4.0


def test_provider_retry_after_as_http_date_is_waited(provider, make_team, make_lease):
    team, lease = _throttled_team(provider, make_team, make_lease, http_date(3), 3)
    result = team_sync_joins(team=team)
    assert result.ok, result.error
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.ACTIVE
    first, retry = _members_calls(provider)
    assert retry - first >= 2.0


@pytest.mark.parametrize("header", ["7200", "date-in-two-hours"])
def test_a_huge_provider_retry_after_pauses_the_host_no_longer_than_the_cap(provider, make_team, make_lease, header):
    from leases.providers.http import host_limiter

    value = http_date(7200) if header == "date-in-two-hours" else header
    team, lease = _throttled_team(provider, make_team, make_lease, value, 7200)
    result = team_sync_joins(team=team)
    assert not result.ok and "429" in result.error  # too long to wait now: the next sync tries again
    lease.refresh_from_db()
    assert lease.status == LeaseStatus.PENDING
    key = host_limiter(team.api_base)._key  # the limiter's Redis key
    paused = limiter_pause_seconds(redis.Redis.from_url(settings.REDIS_URL), key)
    assert paused <= PROVIDER_MAX_WAIT < VISIBILITY_TIMEOUT, f"every provider call would sleep {paused:.0f} s"
    assert paused > PROVIDER_MAX_WAIT - 10  # and it was paused: the host is throttled for a while
