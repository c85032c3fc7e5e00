"""QR-code login (DESIGN §3): add a token by scanning, in the terminal or in the admin.

One service for both ways. ``qr_login_create`` records a login (no upstream call);
``qr_login_step`` does one step of it against the 报名工具 API — fetch the QR code (``pc_code``)
while ``starting``, else poll ``pc_login`` once — under the shared rate limiter. The command calls
it about once a second in its own process (``qr_login_wait``); in the admin the Celery task
``tokens.qr_login_poll`` does one step per tick and schedules the next (``qr_login_tick``), and
pages only read the row. A login ends ``succeeded`` (its token stored by ``token_store_login``),
``expired`` (our ``BAOMING_QR_TIMEOUT``, or the upstream ended it), ``failed`` or ``cancelled``;
an ended login forgets its code and picture.

Nothing here logs, returns in a message or stores in clear the token or the login code.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from leasesite.crypto import fingerprint_secret
from leasesite.ratelimit import RateLimiter, get_rate_limiter
from tokens.clients import (
    MAX_IDENTITY_CHARS,
    BaomingClient,
    QrCodeError,
    QrIdentity,
    QrPollOutcome,
    get_baoming_client,
)
from tokens.models import QR_LOGIN_OPEN_STATUSES, BaomingToken, QrLogin, QrLoginStatus
from tokens.services.tokens import TokenValidationError, _normalize_name, _normalize_token

logger = logging.getLogger(__name__)

QR_POLL_INTERVAL_SECONDS = 1.0
# An open login this long past its expiry has nobody polling it any more (its worker died, the
# command was killed): the next new login closes it as expired. Long enough that a step still in
# flight (limiter wait + one request) records its own answer first.
STALE_LOGIN_GRACE = timedelta(seconds=60)
MAX_MESSAGE_CHARS = 300


class TokenOwnerConflictError(TokenValidationError):
    """The token from a login is stored on another person's row: nothing was changed."""


class StoreOutcome(enum.StrEnum):
    ADDED = "added"  # a new row
    REPLACED = "replaced"  # this WeChat user's row got the new token (id and history kept)
    ALREADY_STORED = "already_stored"  # the token was stored already; its identity was brought up to date


@dataclass(frozen=True)
class StoredLogin:
    token: BaomingToken
    outcome: StoreOutcome
    kept_card_name: bool = False  # the existing row kept its card name, not the login's


def _clean_user_name(value: str) -> str:
    text = "".join(char for char in value if char.isprintable() or char == " ").strip()
    return text[:MAX_IDENTITY_CHARS]


def _reset_after_login(row: BaomingToken, *, identity: QrIdentity, user_name: str, now) -> list[str]:
    """A token fresh from a login is valid now: its failure and suspect streaks (which were about
    the old token, or about this one before its owner logged in again) start over."""
    row.unionid = identity.unionid or row.unionid
    if user_name:
        row.user_name = user_name
    if identity.pic:
        row.avatar_url = identity.pic
    row.consecutive_failures = 0
    row.last_error = ""
    row.failing_since = None
    row.suspect_count = 0
    row.suspect_since = None
    row.invalid_in_run = None  # a run that flagged the old token must not delete the new one
    row.last_used = now
    return [
        "unionid",
        "user_name",
        "avatar_url",
        "consecutive_failures",
        "last_error",
        "failing_since",
        "suspect_count",
        "suspect_since",
        "invalid_in_run",
        "last_used",
    ]


def _store_once(*, card_name: str, token: str, identity: QrIdentity, user_name: str) -> StoredLogin:
    fingerprint = fingerprint_secret(token)
    unionid = identity.unionid
    match = Q(fingerprint=fingerprint) | (Q(unionid=unionid) if unionid else Q(pk__in=[]))
    rows = list(BaomingToken.objects.select_for_update().filter(match).order_by("pk"))
    by_token = next((row for row in rows if row.fingerprint == fingerprint), None)
    by_person = next((row for row in rows if unionid and row.unionid == unionid), None)
    now = timezone.now()

    if by_token is not None and by_token.unionid and by_token.unionid != unionid:
        raise TokenOwnerConflictError(
            _("This token is already stored as token #%(id)s (%(card)s) for another WeChat user; nothing was changed.")
            % {"id": by_token.pk, "card": by_token.card_name}
        )
    if by_token is not None and by_person is not None and by_token.pk != by_person.pk:
        raise TokenOwnerConflictError(
            _(
                "This token is already stored as token #%(id)s (%(card)s), while this WeChat user's token is "
                "#%(other)s; nothing was changed."
            )
            % {"id": by_token.pk, "card": by_token.card_name, "other": by_person.pk}
        )
    if by_token is not None:  # the same token again (its row may not have known whose it is)
        fields = _reset_after_login(by_token, identity=identity, user_name=user_name, now=now)
        by_token.save(update_fields=fields)
        return StoredLogin(by_token, StoreOutcome.ALREADY_STORED, kept_card_name=by_token.card_name != card_name)
    if by_person is not None:  # the same person logged in again: their row gets the new token
        by_person.token = token
        fields = _reset_after_login(by_person, identity=identity, user_name=user_name, now=now)
        by_person.save(update_fields=["token", "fingerprint", *fields])
        return StoredLogin(by_person, StoreOutcome.REPLACED, kept_card_name=by_person.card_name != card_name)
    created = BaomingToken.objects.create(
        card_name=card_name,
        user_name=user_name,
        token=token,
        unionid=unionid,
        avatar_url=identity.pic,
    )
    return StoredLogin(created, StoreOutcome.ADDED)


def token_store_login(*, card_name: str, identity: QrIdentity) -> StoredLogin:
    """Store the token of a WeChat login (a QR scan; the same rules suit any source that knows the
    ``unionid``): ``user_name`` = ``uname``, ``avatar_url`` = ``pic``.

    - a row with this ``unionid`` gets the new token (and fingerprint): its id, card name and
      history stay, its failure and suspect counters start over (``REPLACED``);
    - the very same token stored already: its row learns the identity (``ALREADY_STORED``);
    - otherwise a new row with ``card_name`` (``ADDED``).

    Raises ``TokenOwnerConflictError`` when the token is stored for another WeChat user, and
    ``TokenValidationError`` for a malformed token or card name.
    """
    card_name = _normalize_name(card_name, label="card name", required=True)
    token = _normalize_token(identity.access_token)
    user_name = _clean_user_name(identity.uname)
    for attempt in range(2):
        try:
            with transaction.atomic():
                return _store_once(card_name=card_name, token=token, identity=identity, user_name=user_name)
        except IntegrityError:
            # The same person (or token) was stored by someone else at this very moment: the
            # second attempt finds that row and replaces its token instead.
            if attempt:
                raise
    raise AssertionError("unreachable")


# --- the login ---------------------------------------------------------------------------------


def _expire_stale_logins() -> None:
    cutoff = timezone.now() - STALE_LOGIN_GRACE
    QrLogin.objects.filter(status__in=QR_LOGIN_OPEN_STATUSES, expires_at__lt=cutoff).update(
        status=QrLoginStatus.EXPIRED, code="", qrcode="", message=_("Nobody waited for this login any more.")
    )


def qr_login_create(
    *,
    card_name: str,
    requested_by: AbstractBaseUser | None = None,
    dispatch: Callable[[uuid.UUID], None] | None = None,
) -> QrLogin:
    """Record a new login for ``card_name`` (validated; ``TokenValidationError`` otherwise).

    ``dispatch(login_id)``, if given, runs after commit: the admin passes the Celery task that
    fetches the QR code and polls. Nothing here calls the upstream."""
    card_name = _normalize_name(card_name, label="card name", required=True)
    _expire_stale_logins()
    login = QrLogin.objects.create(
        card_name=card_name,
        expires_at=timezone.now() + timedelta(seconds=settings.BAOMING_QR_TIMEOUT),
        requested_by=requested_by if requested_by is not None and requested_by.is_authenticated else None,
    )
    if dispatch is not None:
        login_id = login.pk
        transaction.on_commit(lambda: dispatch(login_id))
    return login


def _close(login_id: uuid.UUID, status: str, *, message: str, **fields: object) -> bool:
    """End an open login (compare-and-swap on its status); it forgets its code and picture."""
    return bool(
        QrLogin.objects.filter(pk=login_id, status__in=QR_LOGIN_OPEN_STATUSES).update(
            status=status, message=message[:MAX_MESSAGE_CHARS], code="", qrcode="", **fields
        )
    )


def _note(login_id: uuid.UUID, message: str) -> None:
    QrLogin.objects.filter(pk=login_id, status__in=QR_LOGIN_OPEN_STATUSES).update(message=message[:MAX_MESSAGE_CHARS])


def qr_login_cancel(*, login_id: uuid.UUID) -> bool:
    """Cancel an open login; False when it had already ended."""
    return _close(login_id, QrLoginStatus.CANCELLED, message=_("Cancelled."))


def _success_message(stored: StoredLogin) -> str:
    names = {"id": stored.token.pk, "card": stored.token.card_name, "user": stored.token.user_name or "-"}
    if stored.outcome == StoreOutcome.REPLACED:
        text = _("Token #%(id)s (%(card)s, WeChat user %(user)s) replaced by the new one; its history is kept.")
    elif stored.outcome == StoreOutcome.ALREADY_STORED:
        text = _("This token was already stored as token #%(id)s (%(card)s, WeChat user %(user)s); it was updated.")
    else:
        text = _("Token #%(id)s added for %(card)s (WeChat user %(user)s).")
    text %= names
    if stored.kept_card_name:
        text += " " + _("It keeps its card name; edit it on the token's page if needed.")
    return text


def _record_login(login_id: uuid.UUID, identity: QrIdentity) -> None:
    """Store the token and end the login, in one transaction: a login cancelled meanwhile stores
    nothing."""
    with transaction.atomic():
        login = QrLogin.objects.select_for_update().filter(pk=login_id, status__in=QR_LOGIN_OPEN_STATUSES).first()
        if login is None:
            return
        try:
            stored = token_store_login(card_name=login.card_name, identity=identity)
        except TokenValidationError as exc:
            _close(login_id, QrLoginStatus.FAILED, message=str(exc))
            logger.warning("QR login %s failed: %s", login_id, exc)
            return
        _close(
            login_id,
            QrLoginStatus.SUCCEEDED,
            message=_success_message(stored),
            token=stored.token,
            replaced=stored.outcome == StoreOutcome.REPLACED,
        )
    logger.info(
        "QR login %s: token #%s %s (card %s, user %s)",
        login_id,
        stored.token.pk,
        stored.outcome,
        stored.token.card_name,
        stored.token.user_name,
    )


def qr_login_step(
    *,
    login_id: uuid.UUID | str,
    tick: int | None = None,
    client: BaomingClient | None = None,
    limiter: RateLimiter | None = None,
) -> QrLogin | None:
    """One step of an open login: fetch its QR code while ``starting``, else poll ``pc_login``
    once; end it when it is past its expiry. Returns the login afterwards.

    With ``tick`` (the Celery chain) the step first claims that tick — ``polls`` goes from
    ``tick`` to ``tick + 1`` — so a message delivered twice polls once; a tick already taken, or a
    login that is gone or ended, returns None.
    """
    open_login = QrLogin.objects.filter(pk=login_id, status__in=QR_LOGIN_OPEN_STATUSES)
    claimed = (
        open_login.filter(polls=tick).update(polls=tick + 1)
        if tick is not None
        else open_login.update(polls=F("polls") + 1)
    )
    if not claimed:
        return None if tick is not None else QrLogin.objects.filter(pk=login_id).first()
    login = QrLogin.objects.get(pk=login_id)
    if timezone.now() >= login.expires_at:
        if login.status == QrLoginStatus.STARTING:  # it never had a QR code to scan
            reason = _("No QR code came from the 报名工具 API before the login expired.")
            _close(login.pk, QrLoginStatus.FAILED, message=f"{reason} {login.message}".strip())
        else:
            _close(login.pk, QrLoginStatus.EXPIRED, message=_("The QR code was not scanned in time."))
        return QrLogin.objects.get(pk=login.pk)
    client = client or get_baoming_client()
    limiter = limiter or get_rate_limiter(name="baoming", rate=settings.BAOMING_RATE_LIMIT)
    limiter.acquire()
    if login.status == QrLoginStatus.STARTING:
        _fetch_qr_code(login, client)
    else:
        _poll_once(login, client)
    return QrLogin.objects.get(pk=login.pk)


def _fetch_qr_code(login: QrLogin, client: BaomingClient) -> None:
    try:
        answer = client.qr_code()
    except QrCodeError as exc:
        if exc.refused:
            _close(
                login.pk,
                QrLoginStatus.FAILED,
                message=_("The 报名工具 API gave no QR code: %(reason)s") % {"reason": exc.message},
            )
        else:
            _note(login.pk, _("Could not get a QR code yet (%(reason)s); trying again.") % {"reason": exc.message})
        return
    QrLogin.objects.filter(pk=login.pk, status=QrLoginStatus.STARTING).update(
        status=QrLoginStatus.WAITING, qrcode=answer.qrcode, code=answer.code, message=""
    )


def _poll_once(login: QrLogin, client: BaomingClient) -> None:
    if not login.code:  # an undecryptable or missing code cannot be polled
        _close(login.pk, QrLoginStatus.FAILED, message=_("The login code is unreadable; start again."))
        return
    result = client.qr_login_poll(login.code)
    match result.outcome:
        case QrPollOutcome.WAITING:
            _note(login.pk, "")
        case QrPollOutcome.NO_ANSWER:
            _note(login.pk, _("No usable answer (%(reason)s); still waiting.") % {"reason": result.message})
        case QrPollOutcome.REFUSED:
            _close(
                login.pk,
                QrLoginStatus.EXPIRED,
                message=_("The 报名工具 API ended this login (%(reason)s): the code expired or was refused.")
                % {"reason": result.message},
            )
        case QrPollOutcome.LOGGED_IN:
            assert result.identity is not None
            _record_login(login.pk, result.identity)


def qr_login_tick(
    *,
    login_id: uuid.UUID | str,
    tick: int,
    schedule_next: Callable[[str, int], None],
) -> QrLogin | None:
    """The Celery task's body: one step, then ``schedule_next(login_id, tick + 1)`` while the
    login is open. A duplicate message (tick taken) does nothing and schedules nothing."""
    login = qr_login_step(login_id=login_id, tick=tick)
    if login is not None and login.is_open:
        schedule_next(str(login.pk), tick + 1)
    return login


def qr_login_wait(
    *,
    login_id: uuid.UUID,
    on_step: Callable[[QrLogin], None] | None = None,
    stop: threading.Event | None = None,
    interval: float = QR_POLL_INTERVAL_SECONDS,
    client: BaomingClient | None = None,
    limiter: RateLimiter | None = None,
) -> QrLogin:
    """Drive a login in this process (the command) until it ends: a step about every
    ``interval`` seconds. ``stop`` set cancels the login."""
    stop = stop or threading.Event()
    while True:
        if stop.is_set():
            qr_login_cancel(login_id=login_id)
            return QrLogin.objects.get(pk=login_id)
        started = time.monotonic()
        login = qr_login_step(login_id=login_id, client=client, limiter=limiter)
        if login is None:
            raise QrLogin.DoesNotExist(f"QR login {login_id} is gone")
        if on_step is not None:
            on_step(login)
        if not login.is_open:
            return login
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
