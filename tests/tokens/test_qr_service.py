"""The QR-login service: storing a login's token (replace by unionid), and the login's steps
against real local HTTP servers (the bundled fake, or a scripted one)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from leasesite.crypto import fingerprint_secret
from leasesite.fakes.baoming_server import FakeBaomingServer, fake_qr_scan
from tests.tokens import qr_fixtures
from tests.tokens.qr_fixtures import answer
from tokens.clients import QrIdentity
from tokens.models import (
    BaomingToken,
    DeletionReason,
    QrLogin,
    QrLoginStatus,
    RefreshRun,
    RunTrigger,
    TokenCheckRecord,
    TokenDeletion,
)
from tokens.services.qrlogin import (
    StoreOutcome,
    TokenOwnerConflictError,
    qr_login_cancel,
    qr_login_create,
    qr_login_step,
    qr_login_tick,
    qr_login_wait,
    token_store_login,
)
from tokens.services.tokens import TokenValidationError

# The QR fixtures (a module of their own, not tests/conftest.py).
fake_baoming = qr_fixtures.fake_baoming
qr_upstream = qr_fixtures.qr_upstream
pytestmark = pytest.mark.django_db
OLD, NEW = "1" * 32, "2" * 32


def identity(token: str = NEW, unionid: str | None = "o-person", uname: str = "小明") -> QrIdentity:
    return QrIdentity(access_token=token, uname=uname, pic="https://example.com/a.png", unionid=unionid)


# --- storing ---------------------------------------------------------------------------------------


def test_a_first_login_adds_a_row_with_its_identity():
    stored = token_store_login(card_name=" 张三 ", identity=identity())
    row = BaomingToken.objects.get()
    assert stored.outcome == StoreOutcome.ADDED and stored.token.pk == row.pk
    assert (row.card_name, row.user_name, row.unionid, row.avatar_url) == (
        "张三",
        "小明",
        "o-person",
        "https://example.com/a.png",
    )
    assert row.token == NEW


def test_a_second_login_of_the_same_person_replaces_the_token_keeping_id_and_history(make_token):
    run = RefreshRun.objects.create(trigger=RunTrigger.BEAT)
    now = timezone.now()
    row = make_token(
        card_name="张三的名片",
        user_name="old name",
        token=OLD,
        unionid="o-person",
        consecutive_failures=4,
        last_error="sta=-9: 登录已过期",
        failing_since=now - timedelta(hours=5),
        suspect_count=2,
        suspect_since=now - timedelta(hours=2),
        invalid_in_run=run,
        last_used=now - timedelta(days=20),
    )
    other = make_token()
    checks = [
        TokenCheckRecord.objects.create(token_pk=row.pk, run=run, outcome="suspect", message="登录已过期"),
        TokenCheckRecord.objects.create(token_pk=row.pk, run=run, outcome="valid", message="ok"),
        TokenCheckRecord.objects.create(token_pk=other.pk, run=run, outcome="valid", message="ok"),
    ]
    deletion = TokenDeletion.objects.create(
        token_pk=999, card_name="gone", token_masked="1111…1111", fingerprint="f", reason=DeletionReason.INVALID
    )
    history_before = list(TokenCheckRecord.objects.order_by("pk").values()) + list(TokenDeletion.objects.values())

    stored = token_store_login(card_name="张三", identity=identity(NEW, "o-person", "小明"))

    assert stored.outcome == StoreOutcome.REPLACED and stored.kept_card_name
    assert BaomingToken.objects.count() == 2
    row.refresh_from_db()
    assert row.token == NEW and row.fingerprint == fingerprint_secret(NEW)
    assert not BaomingToken.objects.filter(fingerprint=fingerprint_secret(OLD)).exists()
    assert (row.card_name, row.user_name, row.avatar_url) == ("张三的名片", "小明", "https://example.com/a.png")
    # The new token is valid now: every streak about the old one starts over, and the run that
    # flagged the old token cannot delete the new one.
    assert (row.consecutive_failures, row.last_error, row.failing_since) == (0, "", None)
    assert (row.suspect_count, row.suspect_since, row.invalid_in_run_id) == (0, None, None)
    assert row.last_used >= now
    history_after = list(TokenCheckRecord.objects.order_by("pk").values()) + list(TokenDeletion.objects.values())
    assert history_after == history_before
    assert [check.token_pk for check in checks[:2]] == [row.pk, row.pk] and deletion.pk


def test_the_same_token_again_records_who_it_belongs_to(make_token):
    row = make_token(token=NEW, card_name="手工添加", user_name="", consecutive_failures=2)
    stored = token_store_login(card_name="手工添加", identity=identity(NEW, "o-person"))
    row.refresh_from_db()
    assert stored.outcome == StoreOutcome.ALREADY_STORED and not stored.kept_card_name
    assert (row.unionid, row.user_name, row.consecutive_failures) == ("o-person", "小明", 0)
    assert BaomingToken.objects.count() == 1


def test_a_token_stored_for_another_person_changes_nothing(make_token):
    row = make_token(token=NEW, unionid="o-someone-else", user_name="别人")
    with pytest.raises(TokenOwnerConflictError, match=f"#{row.pk}"):
        token_store_login(card_name="x", identity=identity(NEW, "o-person"))
    row.refresh_from_db()
    assert (row.unionid, row.user_name, BaomingToken.objects.count()) == ("o-someone-else", "别人", 1)


def test_the_token_on_one_row_and_the_person_on_another_changes_nothing(make_token):
    holder = make_token(token=NEW)  # stored by hand, nobody's identity on it
    person = make_token(token=OLD, unionid="o-person")
    with pytest.raises(TokenOwnerConflictError) as caught:
        token_store_login(card_name="x", identity=identity(NEW, "o-person"))
    assert f"#{holder.pk}" in str(caught.value) and f"#{person.pk}" in str(caught.value)
    person.refresh_from_db()
    assert person.token == OLD and BaomingToken.objects.count() == 2


def test_a_login_without_unionid_is_stored_by_token_alone():
    token_store_login(card_name="a", identity=identity(OLD, None))
    token_store_login(card_name="b", identity=identity(NEW, None))
    assert BaomingToken.objects.filter(unionid__isnull=True).count() == 2


@pytest.mark.parametrize("bad", [identity("short"), identity(NEW.replace("2", "g"))])
def test_a_malformed_token_is_refused(bad):
    with pytest.raises(TokenValidationError):
        token_store_login(card_name="x", identity=bad)
    assert not BaomingToken.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="concurrent writers need PostgreSQL")
def test_the_same_person_logging_in_twice_at_once_ends_with_one_row():
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def login(token: str) -> None:
        try:
            barrier.wait()
            outcomes.append(token_store_login(card_name="x", identity=identity(token, "o-person")).outcome)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcomes.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=login, args=(token,)) for token in (OLD, NEW)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(map(str, outcomes)) == ["added", "replaced"], outcomes
    assert BaomingToken.objects.filter(unionid="o-person").count() == 1


# --- the login's steps -----------------------------------------------------------------------------


def test_a_login_from_qr_code_to_stored_token(fake_baoming):
    login = qr_login_create(card_name="张三")
    assert (login.status, login.polls) == (QrLoginStatus.STARTING, 0)
    assert not fake_baoming.state.arrivals  # creating calls nobody

    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.WAITING and login.qrcode.startswith("https://")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT code FROM {QrLogin._meta.db_table} WHERE id = %s",
            [login.pk.hex if connection.vendor == "sqlite" else login.pk],
        )
        raw_code = cursor.fetchone()[0]
    assert login.code in fake_baoming.qr.codes and raw_code != login.code  # encrypted at rest

    assert qr_login_step(login_id=login.pk).status == QrLoginStatus.WAITING
    fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"uname": "小明", "unionid": "o-1"})
    login = qr_login_step(login_id=login.pk)

    assert login.status == QrLoginStatus.SUCCEEDED and not login.replaced
    assert (login.token.card_name, login.token.user_name, login.token.unionid) == ("张三", "小明", "o-1")
    assert (login.code, login.qrcode, login.polls) == ("", "", 3)  # an ended login forgets its code
    assert f"#{login.token.pk}" in login.message and login.token.token not in login.message
    assert len(fake_baoming.state.arrivals) == 3


def test_a_second_scan_by_the_same_person_replaces_their_token(fake_baoming):
    tokens = []
    for card in ("张三", "张三 again"):
        login = qr_login_step(login_id=qr_login_create(card_name=card).pk)
        fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"unionid": "o-same"})
        login = qr_login_step(login_id=login.pk)
        tokens.append((login.token_id, login.token.token, login.replaced))
    assert tokens[0][0] == tokens[1][0] and tokens[0][1] != tokens[1][1]
    assert (tokens[0][2], tokens[1][2]) == (False, True)
    assert BaomingToken.objects.get().card_name == "张三"


def test_an_expired_login_ends_without_calling_the_upstream(fake_baoming):
    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    QrLogin.objects.filter(pk=login.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    fake_baoming.state.arrivals.clear()
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.EXPIRED and login.message == "二维码未在限定时间内被扫描。"
    assert not fake_baoming.state.arrivals


def test_the_upstream_ending_a_login_makes_it_expired(settings):
    with FakeBaomingServer(qr_lifetime=0.0) as server:
        settings.BAOMING_API_BASE = server.url
        from tokens.clients import _cached_client

        _cached_client.cache_clear()
        login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
        login = qr_login_step(login_id=login.pk)
    _cached_client.cache_clear()
    assert login.status == QrLoginStatus.EXPIRED and "sta=-2" in login.message
    assert not BaomingToken.objects.exists()


def test_garbage_and_outages_keep_the_login_waiting(qr_upstream):
    qr_upstream.login_answers[:] = [
        answer("<html>502</html>", 502),
        answer({"sta": 0, "msg": "ok", "data": {"access_token": "garbage"}}),
        answer({"sta": 0, "msg": "ok", "data": {"access_token": NEW, "uname": "u", "unionid": "o-9"}}),
    ]
    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.WAITING and "HTTP 502" in login.message
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.WAITING and "no valid access_token" in login.message
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.SUCCEEDED and login.token.token == NEW


def test_no_qr_code_yet_keeps_trying_and_a_refusal_fails(qr_upstream):
    qr_upstream.code_answers[:] = [answer("down", 503), answer({"sta": -7, "msg": "不支持"})]
    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    assert login.status == QrLoginStatus.STARTING and "HTTP 503" in login.message
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.FAILED and "sta=-7" in login.message


def test_a_tick_delivered_twice_polls_once(fake_baoming):
    login = qr_login_create(card_name="x")
    assert qr_login_step(login_id=login.pk, tick=0).status == QrLoginStatus.WAITING
    assert qr_login_step(login_id=login.pk, tick=0) is None
    assert len(fake_baoming.state.arrivals) == 1
    assert qr_login_step(login_id=login.pk, tick=1).polls == 2


def test_the_task_body_schedules_the_next_tick_only_while_open(fake_baoming):
    login = qr_login_create(card_name="x")
    scheduled: list[tuple[str, int]] = []
    qr_login_tick(login_id=login.pk, tick=0, schedule_next=lambda *args: scheduled.append(args))
    qr_login_tick(login_id=login.pk, tick=0, schedule_next=lambda *args: scheduled.append(args))  # duplicate
    assert scheduled == [(str(login.pk), 1)]
    fake_qr_scan(base_url=fake_baoming.url, code="latest")
    qr_login_tick(login_id=login.pk, tick=1, schedule_next=lambda *args: scheduled.append(args))
    assert QrLogin.objects.get(pk=login.pk).status == QrLoginStatus.SUCCEEDED
    assert scheduled == [(str(login.pk), 1)]
    assert qr_login_tick(login_id="00000000-0000-0000-0000-000000000000", tick=0, schedule_next=print) is None


def test_a_cancelled_login_stores_nothing_even_when_scanned(fake_baoming):
    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    fake_qr_scan(base_url=fake_baoming.url, code=login.code)
    assert qr_login_cancel(login_id=login.pk)
    assert qr_login_step(login_id=login.pk).status == QrLoginStatus.CANCELLED
    assert not BaomingToken.objects.exists()
    assert not qr_login_cancel(login_id=login.pk)


def test_a_conflicting_token_fails_the_login_clearly(fake_baoming, make_token):
    holder = make_token(token=NEW, unionid="o-other")
    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"access_token": NEW, "unionid": "o-me"})
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.FAILED and f"#{holder.pk}" in login.message
    assert NEW not in login.message


def test_waiting_in_process_stops_when_asked(fake_baoming):
    login = qr_login_create(card_name="x")
    stop = threading.Event()
    seen: list[str] = []

    def on_step(step: QrLogin) -> None:
        seen.append(step.status)
        stop.set()

    final = qr_login_wait(login_id=login.pk, on_step=on_step, stop=stop, interval=0.01)
    assert final.status == QrLoginStatus.CANCELLED and seen == [QrLoginStatus.WAITING]


def test_waiting_in_process_ends_with_the_login(fake_baoming):
    login = qr_login_create(card_name="x")

    def on_step(step: QrLogin) -> None:
        if step.status == QrLoginStatus.WAITING:
            fake_qr_scan(base_url=fake_baoming.url, code="latest")

    final = qr_login_wait(login_id=login.pk, on_step=on_step, interval=0.01)
    assert final.status == QrLoginStatus.SUCCEEDED


def test_an_abandoned_open_login_is_closed_by_the_next_one():
    stale = qr_login_create(card_name="x")
    QrLogin.objects.filter(pk=stale.pk).update(
        status=QrLoginStatus.WAITING, expires_at=timezone.now() - timedelta(hours=1)
    )
    recent = qr_login_create(card_name="y")
    stale.refresh_from_db()
    assert (stale.status, stale.code) == (QrLoginStatus.EXPIRED, "")
    assert QrLogin.objects.get(pk=recent.pk).status == QrLoginStatus.STARTING


@pytest.mark.parametrize("card_name", ["", "   ", "bad\x07name", "x" * 101])
def test_a_bad_card_name_starts_no_login(card_name):
    with pytest.raises(TokenValidationError):
        qr_login_create(card_name=card_name)
    assert not QrLogin.objects.exists()


def test_key_rotation_covers_a_waiting_logins_code(fake_baoming, settings):
    from tests.test_key_rotation import prepend_new_key, rotate

    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    new_key = prepend_new_key(settings)
    assert "tokens.QrLogin.code: re-encrypted 1" in rotate()
    settings.TOKEN_ENCRYPTION_KEYS = [new_key]  # the old key is gone
    assert QrLogin.objects.get(pk=login.pk).code == login.code


def test_a_login_that_never_got_a_qr_code_fails_at_expiry_with_the_reason(qr_upstream):
    qr_upstream.code_answers[:] = [answer("down", 503)]
    login = qr_login_step(login_id=qr_login_create(card_name="x").pk)
    QrLogin.objects.filter(pk=login.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    login = qr_login_step(login_id=login.pk)
    assert login.status == QrLoginStatus.FAILED
    assert login.message.startswith("报名工具 API 在登录到期前没有给出二维码。") and "HTTP 503" in login.message
