from __future__ import annotations

import getpass
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.db import connection
from django.utils import timezone
from django.utils.translation import gettext as _

from tokens.models import QrLogin, QrLoginStatus
from tokens.qrcodes import QrRenderError, is_picture, qr_terminal, save_picture
from tokens.services.qrlogin import qr_login_cancel, qr_login_create, qr_login_wait
from tokens.services.tokens import TokenValidationError, token_add

EXIT_NOT_STORED = 1  # the QR code expired, or the login failed
PLAIN_PROGRESS_EVERY_SECONDS = 15  # without a terminal, a countdown line this often


class _Interrupt:
    """SIGINT / SIGTERM end the wait (the login is cancelled after the step in flight); a second
    one stops at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.armed = True  # False once the login has ended

    def __call__(self, signum: int, frame: object) -> None:
        if not self.armed:
            return
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


@contextmanager
def _handling_interrupts(interrupt: _Interrupt) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled in the main thread (call_command from a thread)
        return
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Countdown:
    """The visible countdown: one line rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, out: OutputWrapper, *, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.last_plain: float | None = None
        self.drawn = False

    def show(self, login: QrLogin) -> None:
        left = max(0, int((login.expires_at - timezone.now()).total_seconds()))
        if login.status == QrLoginStatus.STARTING:
            text = _("Getting a QR code… %(seconds)s s left") % {"seconds": left}
        else:
            text = _("Waiting for the scan… %(seconds)s s left (Ctrl-C cancels)") % {"seconds": left}
        if login.message:
            text += f" — {login.message}"
        if self.tty:
            self.out.write(f"\r{text}\x1b[K", ending="")
            self.out.flush()
            self.drawn = True
        elif self.last_plain is None or time.monotonic() - self.last_plain >= PLAIN_PROGRESS_EVERY_SECONDS:
            self.out.write(text)
            self.last_plain = time.monotonic()

    def end(self) -> None:
        if self.drawn:
            self.out.write("")  # leave the countdown line as it was, go to the next one
            self.drawn = False


class Command(BaseCommand):
    help = (
        "Store one 报名工具 token. The token is read from standard input (pipe it in) or a hidden "
        "prompt, never from the command line, so it does not end up in shell history or ps. "
        "With --scan: log in with WeChat instead — the command shows a QR code, waits for the scan "
        f"and stores the token it gets. Exit status with --scan: 0 stored, {EXIT_NOT_STORED} expired "
        "or failed, 130 cancelled with Ctrl-C (143 SIGTERM)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--card-name", help="the card name (名片); prompted for if omitted on a terminal")
        parser.add_argument("--user-name", default="", help="the user's name")
        parser.add_argument(
            "--scan",
            action="store_true",
            help="show a QR code to scan with WeChat and store the token of that login (user name = WeChat name)",
        )

    def handle(self, *args: object, **options: object) -> None:
        interactive = sys.stdin.isatty()
        card_name = options["card_name"]
        if options["scan"] and options["user_name"]:
            raise CommandError("--user-name comes from the WeChat login with --scan; leave it out")
        if not card_name:
            if not interactive:
                raise CommandError(
                    "--card-name is required with --scan"
                    if options["scan"]
                    else "--card-name is required when the token is piped in"
                )
            card_name = input("Card name (名片): ")
        if options["scan"]:
            self._scan(card_name)
            return
        try:
            token = getpass.getpass("Token (hidden): ") if interactive else sys.stdin.readline()
        except UnicodeDecodeError:
            raise CommandError(
                "the token on standard input is not UTF-8 text (a token is 32 hexadecimal characters)"
            ) from None
        try:
            stored = token_add(card_name=card_name, user_name=options["user_name"], token=token)
        except TokenValidationError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"stored token #{stored.pk} for {stored.card_name} ({stored.masked_token})")

    # --- --scan ----------------------------------------------------------------------------------

    def _scan(self, card_name: str) -> None:
        try:
            login = qr_login_create(card_name=card_name)
        except TokenValidationError as exc:
            raise CommandError(str(exc)) from None
        tty = self.stdout.isatty()
        countdown = _Countdown(self.stdout, tty=tty)
        shown: list[Path | None] = []  # the QR code was shown (and the picture file, if any)
        interrupt = _Interrupt()

        def on_step(step: QrLogin) -> None:
            if not step.is_open:
                return
            if step.status == QrLoginStatus.WAITING and not shown:
                countdown.end()
                shown.append(self._show_qr(step, tty=tty))
            countdown.show(step)

        # The handlers stay until the command has reported, so a late Ctrl-C never surfaces as
        # a traceback; once the login has ended, further signals change nothing.
        with _handling_interrupts(interrupt):
            try:
                final = qr_login_wait(login_id=login.pk, on_step=on_step, stop=interrupt.event)
            except KeyboardInterrupt:  # a second Ctrl-C while a step was still on its way
                final = self._cancel_after_interrupt(login)
            finally:
                interrupt.armed = False
                countdown.end()
                for picture in shown:
                    if picture is not None:
                        picture.unlink(missing_ok=True)
            self._report(final, interrupt)

    @staticmethod
    def _cancel_after_interrupt(login: QrLogin) -> QrLogin:
        """Cancel on a fresh connection: the interrupted one may be stuck mid-query."""
        connection.close()
        qr_login_cancel(login_id=login.pk)
        return QrLogin.objects.get(pk=login.pk)

    def _show_qr(self, login: QrLogin, *, tty: bool) -> Path | None:
        """Print the QR code (or where its picture was saved); the picture's path, if any."""
        self.stdout.write(
            _("Scan this QR code with WeChat to log in to 报名工具 as card %(card)s:") % {"card": login.card_name}
        )
        try:
            if is_picture(login.qrcode):
                path = save_picture(login.qrcode, folder=Path(settings.VAR_DIR) / "qr-logins", stem=str(login.pk))
                self.stdout.write(
                    _("The QR code is a picture: open %(path)s and scan it (it is deleted when this command ends).")
                    % {"path": path}
                )
                return path
            self.stdout.write(qr_terminal(login.qrcode, color=tty), ending="")
        except (QrRenderError, OSError) as exc:
            qr_login_cancel(login_id=login.pk)
            raise CommandError(_("Cannot show the QR code: %(reason)s") % {"reason": exc}) from None
        return None

    def _report(self, login: QrLogin, interrupt: _Interrupt) -> None:
        if login.status == QrLoginStatus.SUCCEEDED:
            # The message names the token's id, card and WeChat user, and whether it replaced one.
            self.stdout.write(self.style.SUCCESS(login.message))
            return
        if login.status == QrLoginStatus.CANCELLED:
            raise CommandError(_("Cancelled: no token was stored."), returncode=interrupt.exit_code)
        if login.status == QrLoginStatus.EXPIRED:
            raise CommandError(
                _("No token stored: %(reason)s Run the command again for a new QR code.") % {"reason": login.message},
                returncode=EXIT_NOT_STORED,
            )
        raise CommandError(_("No token stored: %(reason)s") % {"reason": login.message}, returncode=EXIT_NOT_STORED)
