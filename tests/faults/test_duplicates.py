"""Fault family 3: duplicates. The same task delivered twice at the same moment (same arguments,
same task id, as a broker redelivery would), to two real worker processes released together;
and two ``celery beat`` processes firing every schedule every few seconds for a minute.

One effect each time: one upstream call per token, one invite per lease at the fake team
provider, one reminder mail at a real local SMTP server, one event per transition, one run
recorded — the other delivery refused or finding nothing to do, and saying so in its logged
result.

The two deliveries are queued before the workers start; each worker takes one and waits at a
barrier in ``task_prerun`` (``_h5_barrier``) until both have arrived, then both run at once.
Where the first delivery's work would otherwise end before the second begins, the fake upstream
holds the first one's call until the second has finished, so the overlap is certain, not likely.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.utils import timezone
from pytest_httpserver import HTTPServer

from leases import events
from leases.models import LeaseAction, LeaseEvent, LeaseStatus, MemberLease
from leases.services.transitions import lease_transition
from leasesite.fakes.team_provider_server import FakeProviderServer
from tests.conftest import Upstream, json_answer, ok
from tests.faults._h5_support import Duo, alert_sink_start, recount_seats, subprocess_env
from tests.faults.processes import celery_beat, stop, wait_for
from tests.lease_fixtures import TEAM_TOKEN
from tests.leases.test_reminders import SmtpSink
from tokens.models import LIVE_RUN_STATUSES, BaomingToken, RefreshRun, RunKind, RunStatus, TokenDeletion

pytestmark = pytest.mark.django_db(transaction=True)

DAY = timedelta(days=1)


# -- one set of servers and two workers for the whole module (a worker takes seconds to start) ------
@pytest.fixture(scope="module")
def servers(django_db_setup, django_db_blocker):
    upstream_server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    upstream_server.start()
    fake = Upstream(upstream_server)
    upstream_server.expect_request("/xcx/enroll/v3/detail").respond_with_handler(fake.handle)
    team_provider = FakeProviderServer(token=TEAM_TOKEN).start()
    smtp, alerts = SmtpSink(), alert_sink_start()
    smtp.start()
    yield SimpleNamespace(upstream=fake, provider=team_provider, smtp=smtp, alerts=alerts)
    smtp.stop()
    alerts.server.stop()
    team_provider.stop()
    upstream_server.stop()


@pytest.fixture(scope="module")
def workers(servers, django_db_blocker, tmp_path_factory):
    with django_db_blocker.unblock():
        env = subprocess_env(
            BAOMING_API_BASE=servers.upstream.url,
            EMAIL_URL=f"smtp://127.0.0.1:{servers.smtp.port}",
            NOTIFY_URLS=servers.alerts.notify_url,
            LEASE_PUBLIC_BASE_URL="https://seats.example.com",
        )
    duo = Duo(env=env, log_dir=tmp_path_factory.mktemp("h5-workers"))
    duo.start()
    yield duo
    duo.stop()


@pytest.fixture
def upstream(servers, settings):
    """This module's 报名工具 server (the workers know its address), emptied for each test."""
    from tokens.clients import _cached_client

    fake = servers.upstream
    with fake._lock:
        fake.answers.clear()
        fake.requests.clear()
    settings.BAOMING_API_BASE = fake.url
    _cached_client.cache_clear()
    yield fake
    _cached_client.cache_clear()


@pytest.fixture
def provider(servers):
    """This module's team provider server, with no teams and no requests for each test."""
    state = servers.provider.state
    with state._lock:
        state.teams.clear()
        state.requests.clear()
        state.request_times.clear()
    for flag in (state.hold_deletes, state.hold_invites, state.delete_arrived, state.invite_arrived):
        flag.clear()
    state.discard_held_deletes = False
    yield servers.provider
    state.hold_deletes.clear()
    state.hold_invites.clear()


@pytest.fixture
def smtp(servers):
    with servers.smtp.lock:
        servers.smtp.messages.clear()
    return servers.smtp


@pytest.fixture
def alerts(servers):
    servers.alerts.clear()
    return servers.alerts


@pytest.fixture
def duo(workers, upstream, provider):
    """The two workers, their barrier disarmed and their logs read from now on; after the test,
    no traceback in what they logged."""
    workers.reset()
    yield workers
    text = workers.text()
    workers.reset()
    assert "Traceback" not in text, text[-6000:]


def send_twice(duo: Duo, task, **kwargs: object) -> str:
    """Two identical messages (same kwargs, same task id: what a broker redelivery looks like),
    each held at the workers' barrier until ``duo.release()``."""
    duo.reset(task.name)
    task_id = uuid.uuid4().hex
    for _ in range(2):
        task.apply_async(kwargs=kwargs, task_id=task_id)
    return task_id


def lease_actions(lease: MemberLease, action: str) -> int:
    return LeaseEvent.objects.filter(lease=lease, action=action).count()


# -- tokens ----------------------------------------------------------------------------------------
def test_refresh_tokens_twice_checks_each_token_once(duo, upstream, make_token):
    from tokens.tasks import refresh_tokens

    tokens = [make_token() for _ in range(6)]
    checks_may_answer = threading.Event()

    def held_ok():
        checks_may_answer.wait(60)  # the run stays open until the other delivery has finished
        return ok()

    for token in tokens:
        upstream.answers[token.token] = held_ok
    send_twice(duo, refresh_tokens, max_age_days=None)
    duo.release()
    results = duo.wait_succeeded("tokens.refresh_tokens", 2)
    checks_may_answer.set()

    run = wait_for(
        lambda: RefreshRun.objects.filter(kind=RunKind.REFRESH).exclude(status__in=LIVE_RUN_STATUSES).first(),
        timeout=60,
        what="the refresh run to end",
    )
    assert RefreshRun.objects.filter(kind=RunKind.REFRESH).count() == 1
    assert (run.status, run.ok, run.total) == (RunStatus.SUCCEEDED, 6, 6)
    assert sorted(results) == sorted(["None", str(run.pk)])
    assert "refresh run skipped: another refresh run is in progress" in duo.text()
    assert [upstream.calls_for(t.token) for t in tokens] == [1] * 6
    assert len(upstream.requests) == 6


def test_cleanup_tokens_twice_deletes_each_token_once_in_one_run(duo, upstream):
    from tokens.tasks import cleanup_tokens

    now = timezone.now()
    stale = [
        BaomingToken(card_name=f"旧{n}", user_name=f"u{n}", token=uuid.uuid4().hex, last_used=now - 40 * DAY)
        for n in range(1200)
    ]
    BaomingToken.objects.bulk_create(stale, batch_size=500)
    BaomingToken.objects.update(last_answered_at=now - DAY)  # the upstream answered, without vouching
    live = BaomingToken.objects.create(card_name="新", user_name="new", token=uuid.uuid4().hex, last_used=now)

    send_twice(duo, cleanup_tokens, days=30)
    duo.release()
    results = duo.wait_succeeded("tokens.cleanup_tokens", 2)

    runs = list(RefreshRun.objects.filter(kind=RunKind.CLEANUP).order_by("pk"))
    assert TokenDeletion.objects.count() == 1200
    assert TokenDeletion.objects.values("fingerprint").distinct().count() == 1200
    assert list(BaomingToken.objects.values_list("pk", flat=True)) == [live.pk]
    # One run did the work. Started together, the other is refused by the run lock; had it only
    # started after the first ended, it would be a run of its own that found nothing stale.
    doing = [run for run in runs if run.deleted]
    assert [(r.status, r.deleted) for r in doing] == [(RunStatus.SUCCEEDED, 1200)], [(r.pk, r.deleted) for r in runs]
    if len(runs) == 1:
        assert sorted(results) == sorted(["None", str(runs[0].pk)])
        assert "cleanup run skipped: another cleanup run is in progress" in duo.text()
    else:
        assert [r.deleted for r in runs if r not in doing] == [0]


# -- leases ----------------------------------------------------------------------------------------
def test_sync_joins_twice_activates_and_invites_once(duo, provider, make_team, make_lease):
    from leases.tasks import sync_joins

    alpha = make_team("alpha")
    joining = make_lease(alpha)
    provider.state.team("alpha").add_member(joining.email)
    never_invited = make_lease(alpha, invited_at=None)
    recount_seats()
    provider.state.hold_invites.set()  # the first sync waits inside its invite, holding the team

    send_twice(duo, sync_joins, team_id=None)
    duo.release()
    wait_for(
        lambda: duo.succeeded("leases.sync_joins") or provider.state.calls("alpha", "POST") >= 2,
        timeout=60,
        what="the second sync to end while the first invites",
    )
    provider.state.hold_invites.clear()
    results = duo.wait_succeeded("leases.sync_joins", 2)

    joining.refresh_from_db()
    assert joining.status == LeaseStatus.ACTIVE
    assert lease_actions(joining, LeaseAction.JOINED) == 1
    assert provider.state.team("alpha").invite_posts == [never_invited.email]
    assert lease_actions(never_invited, LeaseAction.INVITED) == 1
    skipped = [r for r in results if "another sync of this team is running" in r]
    assert len(skipped) == 1, results  # the other was refused by the team's lock, and says so


def test_run_transfers_twice_moves_each_lease_once(duo, provider, make_team, make_lease):
    from leases.tasks import run_transfers

    alpha, _beta = make_team("alpha"), make_team("beta")
    due = [make_lease(alpha, LeaseStatus.ACTIVE, expires_at=timezone.now() - timedelta(minutes=1)) for _ in range(3)]
    for lease in due:
        provider.state.team("alpha").add_member(lease.email)
    recount_seats()
    provider.state.hold_invites.set()

    send_twice(duo, run_transfers)
    duo.release()
    wait_for(
        lambda: duo.succeeded("leases.run_transfers") or provider.state.calls("beta", "POST") >= 2,
        timeout=60,
        what="the second run to end while the first invites",
    )
    provider.state.hold_invites.clear()
    results = duo.wait_succeeded("leases.run_transfers", 2)

    summaries = [json.loads(r.replace("'", '"')) for r in results]
    assert sorted((s["claimed"], s.get("transferred", 0)) for s in summaries) == [(0, 0), (3, 3)]
    assert sorted(provider.state.team("beta").invite_posts) == sorted(lease.email for lease in due)
    for lease in due:
        lease.refresh_from_db()
        assert (lease.status, lease.team.name) == (LeaseStatus.PENDING, "beta")
        assert lease_actions(lease, LeaseAction.TRANSFER_STARTED) == 1
        assert lease_actions(lease, LeaseAction.TRANSFERRED) == 1
        assert lease.email not in provider.state.team("alpha").member_emails()
    assert provider.state.calls("alpha", "DELETE") == 3


def test_check_orphans_twice_alerts_once(duo, provider, alerts, make_team):
    from leases.tasks import check_orphans

    alpha = make_team("alpha")
    provider.state.team("alpha").add_member("stranger@example.com")  # a member without a lease

    send_twice(duo, check_orphans)
    duo.release()
    results = duo.wait_succeeded("leases.check_orphans", 2)

    assert results == ["1", "1"]  # both looked, and both saw the one problem
    found = [m for m in alerts.messages() if "stranger@example.com" in m]
    assert len(found) == 1, alerts.messages()  # but people hear of it once
    assert f"team {alpha.name}" in found[0]


def test_send_reminders_twice_mails_once(duo, smtp, make_team, make_lease):
    from leases.tasks import send_reminders

    lease = make_lease(make_team("alpha"), LeaseStatus.ACTIVE, ends_at=timezone.now() + 2 * DAY)
    recount_seats()

    send_twice(duo, send_reminders)
    duo.release()
    results = [json.loads(r.replace("'", '"')) for r in duo.wait_succeeded("leases.send_reminders", 2)]

    assert len(smtp.to(lease.email)) == 1
    assert len(smtp.messages) == 1
    assert lease_actions(lease, LeaseAction.REMINDED) == 1
    assert sorted(r["sent"] for r in results) == [0, 1]
    idle = next(r for r in results if r["sent"] == 0)
    assert idle["busy"] == 1 or idle["skipped"] == 1, results  # refused by the lock, or found it done


def _redeliver(duo: Duo, task, **kwargs: object) -> None:
    """One message; when it has been worked, the same message again (its ack was lost)."""
    duo.reset()
    task_id = uuid.uuid4().hex
    task.apply_async(kwargs=kwargs, task_id=task_id)
    duo.wait_succeeded(task.name, 1)
    task.apply_async(kwargs=kwargs, task_id=task_id)


@pytest.mark.parametrize("timing", ["together", "redelivered"])
def test_invite_lease_twice_invites_once(duo, provider, make_team, make_lease, timing):
    """``together``: both deliveries start at once (the first is held inside its invite);
    ``redelivered``: the copy arrives after the first one ended (its ack was lost)."""
    from leases.tasks import invite_lease

    lease = make_lease(make_team("alpha"), invited_at=None)  # redeemed on the web just now
    recount_seats()
    if timing == "together":
        provider.state.hold_invites.set()
        send_twice(duo, invite_lease, lease_id=lease.pk)
        duo.release()
        wait_for(
            lambda: duo.succeeded("leases.invite_lease") or provider.state.calls("alpha", "POST") >= 2,
            timeout=60,
            what="the second delivery to end while the first invites",
        )
        provider.state.hold_invites.clear()
    else:
        _redeliver(duo, invite_lease, lease_id=lease.pk)
    results = duo.wait_succeeded("leases.invite_lease", 2)

    assert provider.state.team("alpha").invite_posts == [lease.email]
    assert lease_actions(lease, LeaseAction.INVITED) == 1
    assert sorted(results) == ["False", "True"]


@pytest.mark.parametrize("timing", ["together", "redelivered"])
def test_free_seats_twice_frees_once(duo, provider, make_team, make_lease, timing):
    from leases.tasks import free_seats

    alpha = make_team("alpha")
    lease = make_lease(alpha, LeaseStatus.ACTIVE)
    member_id = provider.state.team("alpha").add_member(lease.email)
    recount_seats()
    lease_transition(lease_id=lease.pk, to_status=LeaseStatus.CANCELLED, **events.cancelled(reason="operator"))
    seats = [[alpha.pk, member_id]]
    if timing == "together":
        provider.state.hold_deletes.set()
        send_twice(duo, free_seats, lease_id=lease.pk, seats=seats, actor_id=None)
        duo.release()
        wait_for(
            lambda: duo.succeeded("leases.free_seats") or provider.state.calls("alpha", "DELETE") >= 2,
            timeout=60,
            what="the second delivery to end while the first frees the seat",
        )
        provider.state.hold_deletes.clear()
    else:
        _redeliver(duo, free_seats, lease_id=lease.pk, seats=seats, actor_id=None)
    results = duo.wait_succeeded("leases.free_seats", 2)

    assert provider.state.calls("alpha", "DELETE") == 1
    assert lease.email not in provider.state.team("alpha").member_emails()
    assert lease_actions(lease, LeaseAction.LEFT_OLD_TEAM) == 1
    assert lease_actions(lease, LeaseAction.SEAT_NOT_FREED) == 0
    assert results == ["[]", "[]"]  # neither reports a seat it could not free


def test_invite_lease_of_a_missing_lease_is_nothing_to_do(duo, provider, make_team, make_lease):
    """Copies of a message whose lease is not there (a database restored from a backup, a test
    database flushed under a queue): no invite, no traceback, and the log says why."""
    from leases.tasks import invite_lease

    lease = make_lease(make_team("alpha"), invited_at=None)
    lease_id = lease.pk + 1000  # leases are never deleted (their events protect them)

    send_twice(duo, invite_lease, lease_id=lease_id)
    duo.release()

    assert duo.wait_succeeded("leases.invite_lease", 2) == ["False", "False"]
    assert provider.state.team("alpha").invite_posts == []
    assert duo.text().count(f"invite of lease {lease_id} not sent: the lease no longer exists") == 2


# -- two beats -------------------------------------------------------------------------------------
BEAT_SECONDS = 55
EVERY_SECONDS = 3


def _quiet() -> bool:
    from django.conf import settings

    from leasesite.celery import app

    with app.connection_for_read() as conn:
        queued = conn.default_channel.client.llen(settings.CELERY_TASK_DEFAULT_QUEUE)  # the Redis broker's list
    if queued or RefreshRun.objects.filter(status__in=LIVE_RUN_STATUSES).exists():
        return False
    active = app.control.inspect(timeout=1.0).active() or {}
    return len(active) == 2 and not any(active.values())


def _overlapping(runs: list[RefreshRun]) -> list[tuple[int, int]]:
    spans = sorted((r.started_at, r.ended_at, r.pk) for r in runs)
    return [(a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


def test_two_beats_for_a_minute_do_each_thing_once(
    duo, workers, upstream, provider, smtp, alerts, make_team, make_lease, make_token, tmp_path
):
    """Two ``celery beat`` processes, every schedule every few seconds, two workers, a minute.
    README: keep exactly one beat, since a second sends every schedule twice and only one keeps
    the intervals right; the code guarantees that doubled messages do no double work (the
    refresh run lock, the cleanup lock, team sync locks, lease claims, the reminders lock,
    alert states). That is what is asserted, not one run per interval."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from leasesite.schedules import schedules_install

    now = timezone.now()
    # Tokens: valid ones whose answers take a second, so runs last and the beats fire into
    # them; stale ones the upstream answers about without vouching for them (cleanup deletes them).
    valid = [make_token() for _ in range(8)]
    for token in valid:
        upstream.answers[token.token] = lambda: (time.sleep(1.0), ok())[1]
    stale = [make_token(last_used=now - 40 * DAY) for _ in range(5)]
    BaomingToken.objects.filter(pk__in=[t.pk for t in stale]).update(last_answered_at=now - DAY)
    not_yet = json_answer({"sta": 1, "msg": "报名未开始", "data": None})
    for token in stale:
        upstream.answers[token.token] = not_yet
    # Leases: due for transfer, waiting to be seen joined, one with a reminder due; a stranger.
    alpha, _beta = make_team("alpha"), make_team("beta")
    due = [make_lease(alpha, LeaseStatus.ACTIVE, expires_at=now - timedelta(minutes=1)) for _ in range(3)]
    joining = [make_lease(alpha) for _ in range(2)]
    ending = make_lease(alpha, LeaseStatus.ACTIVE, ends_at=now + 2 * DAY, expires_at=now + 20 * DAY)
    for lease in [*due, *joining, ending]:
        provider.state.team("alpha").add_member(lease.email)
    provider.state.team("alpha").add_member("stranger@example.com")
    recount_seats()

    schedules_install()
    often, _ = IntervalSchedule.objects.get_or_create(every=EVERY_SECONDS, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.update(interval=often, crontab=None, expire_seconds=2 * EVERY_SECONDS, last_run_at=None)
    PeriodicTask.objects.filter(name="celery.backend_cleanup").delete()
    assert {
        "tokens.refresh_tokens",
        "tokens.cleanup_tokens",
        "leases.sync_joins",
        "leases.run_transfers",
        "leases.check_orphans",
        "leases.send_reminders",
    } <= set(PeriodicTask.objects.filter(enabled=True).values_list("task", flat=True))

    beat_logs = [tmp_path / f"h5-beat{n}.log" for n in range(2)]
    beats = [celery_beat(workers.env, log) for log in beat_logs]
    try:
        time.sleep(BEAT_SECONDS)  # how long the experiment lasts; nothing is asserted on time
    finally:
        for beat in beats:
            stop(beat)
    # Let what beat sent finish (or expire): nothing queued, nothing running, no run left open.
    wait_for(_quiet, timeout=90, interval=0.5, what="the workers to finish what the beats sent")
    text = duo.text()
    sending = [line for log in beat_logs for line in log.read_text().splitlines() if "Sending due task" in line]
    sent = {
        task: sum(f"({task})" in line for line in sending) for task in ("tokens.refresh_tokens", "leases.run_transfers")
    }

    # The run lock: refresh runs never overlap, and each run checks each token once.
    refreshes = list(RefreshRun.objects.filter(kind=RunKind.REFRESH).order_by("started_at"))
    assert refreshes
    assert {r.status for r in refreshes} == {RunStatus.SUCCEEDED}, [(r.pk, r.status, r.error) for r in refreshes]
    assert _overlapping(refreshes) == []
    assert [upstream.calls_for(t.token) for t in valid] == [len(refreshes)] * len(valid)
    refused = text.count("refresh run skipped: another refresh run is in progress")
    assert refused >= 1  # the beats did fire into running runs, and the lock said no
    # Cleanup: each stale token deleted once, with one audit record; nothing live lost.
    cleanups = list(RefreshRun.objects.filter(kind=RunKind.CLEANUP).order_by("started_at"))
    assert _overlapping(cleanups) == []
    assert TokenDeletion.objects.count() == len(stale)
    assert TokenDeletion.objects.values("fingerprint").distinct().count() == len(stale)
    assert BaomingToken.objects.filter(pk__in=[t.pk for t in valid]).count() == len(valid)
    # Claims and team locks: every lease moved, joined and reminded once.
    for lease in due:
        lease.refresh_from_db()
        assert (lease.status, lease.team.name) == (LeaseStatus.PENDING, "beta")
        assert lease_actions(lease, LeaseAction.TRANSFER_STARTED) == 1
        assert lease_actions(lease, LeaseAction.TRANSFERRED) == 1
    assert sorted(provider.state.team("beta").invite_posts) == sorted(lease.email for lease in due)
    assert provider.state.team("alpha").invite_posts == []
    for lease in joining:
        assert lease_actions(lease, LeaseAction.JOINED) == 1
    assert lease_actions(ending, LeaseAction.REMINDED) == 1
    assert [m.rcpts for m in smtp.messages] == [[ending.email]]
    assert len([m for m in alerts.messages() if "stranger@example.com" in m]) == 1, alerts.messages()
    print(
        f"two beats, {BEAT_SECONDS} s, every {EVERY_SECONDS} s: beat sent {sent}; "
        f"{len(refreshes)} refresh runs, {refused} refused by the run lock, {len(cleanups)} cleanup runs, "
        f"{len(upstream.requests)} upstream calls, {len(alerts.alerts)} alerts"
    )
