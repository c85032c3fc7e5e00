"""``add_baoming_token --scan``: the real command in a subprocess on a pseudo-terminal (and on
pipes), against the bundled fake 报名工具 server, scanned through its control endpoint while the
command waits."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from leasesite.fakes.baoming_server import FakeBaomingServer, fake_qr_scan
from tests.tokens import qr_fixtures
from tests.tokens.qr_fixtures import answer, subprocess_env, wait_for_login
from tokens.models import BaomingToken, QrLogin, QrLoginStatus

# The QR fixtures (a module of their own, not tests/conftest.py).
fake_baoming = qr_fixtures.fake_baoming
qr_upstream = qr_fixtures.qr_upstream
pytestmark = pytest.mark.django_db(transaction=True)
BASE = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "manage.py", "add_baoming_token", "--scan"]


def _take_the_terminal() -> None:
    """In the child: make the pseudo-terminal (its stdin) its controlling terminal, so a Ctrl-C
    typed there reaches it as SIGINT, as in a shell."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class TerminalRun:
    """The command on a pseudo-terminal; everything it writes is collected."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        master, slave = os.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            [*COMMAND, *args],
            cwd=BASE,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_the_terminal,  # only an ioctl between fork and exec
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            self._reader.join(5)
            os.close(self.master)
        return code, b"".join(self._chunks).decode("utf-8", errors="replace")


def en_env(server: FakeBaomingServer, **extra: str) -> dict[str, str]:
    return subprocess_env(base_url=server.url, DJANGO_LANGUAGE_CODE="en", **extra)


def waiting_login() -> QrLogin:
    return wait_for_login(lambda login: login.status == QrLoginStatus.WAITING)


def assert_clean(output: str) -> None:
    assert "Traceback" not in output, output
    for token in BaomingToken.objects.values_list("token", flat=True):
        assert token not in output
    for code in QrLogin.objects.values_list("code", flat=True):
        assert not code or code not in output


def test_scan_on_a_terminal_stores_the_token_and_prints_who(fake_baoming):
    run = TerminalRun(en_env(fake_baoming), "--card-name", "张三")
    login = waiting_login()
    fake_qr_scan(base_url=fake_baoming.url, code=login.code, details={"uname": "小明", "unionid": "o-cli"})
    code, output = run.finish()

    assert code == 0, output
    token = BaomingToken.objects.get()
    assert (token.card_name, token.user_name, token.unionid) == ("张三", "小明", "o-cli")
    assert "\x1b[30;107m" in output and "▀" in output  # the QR code, black on white whatever the theme
    assert "Waiting for the scan" in output and "\r" in output  # the countdown, redrawn in place
    assert f"Token #{token.pk} added for 张三 (WeChat user 小明)." in output
    assert_clean(output)


def test_scan_messages_are_translated(fake_baoming):
    run = TerminalRun(subprocess_env(base_url=fake_baoming.url, DJANGO_LANGUAGE_CODE="zh-hans"), "--card-name", "张三")
    fake_qr_scan(base_url=fake_baoming.url, code=waiting_login().code, details={"uname": "小明"})
    code, output = run.finish()
    assert code == 0, output
    assert "等待扫码" in output and "已添加" in output
    assert_clean(output)


@pytest.mark.parametrize(("how", "exit_code"), [("ctrl-c", 130), ("ctrl-c twice", 130), ("sigterm", 143)])
def test_ctrl_c_and_sigterm_cancel_cleanly(fake_baoming, how, exit_code):
    run = TerminalRun(en_env(fake_baoming), "--card-name", "张三")
    login = waiting_login()
    if how == "ctrl-c":
        run.type(b"\x03")
    elif how == "ctrl-c twice":
        run.type(b"\x03\x03")
    else:
        run.proc.send_signal(signal.SIGTERM)
    code, output = run.finish(timeout=30)

    assert code == exit_code, output
    assert "Cancelled: no token was stored." in output
    login.refresh_from_db()
    assert login.status == QrLoginStatus.CANCELLED and login.code == ""
    assert not BaomingToken.objects.exists()
    assert_clean(output)


def test_an_expired_code_stops_with_a_clear_message():
    with FakeBaomingServer(qr_lifetime=1.0) as server:
        run = TerminalRun(en_env(server), "--card-name", "张三")
        code, output = run.finish()
    assert code == 1, output
    assert "No token stored:" in output and "the code expired or was refused" in output
    assert "Run the command again for a new QR code." in output
    assert QrLogin.objects.get().status == QrLoginStatus.EXPIRED
    assert not BaomingToken.objects.exists()
    assert_clean(output)


def test_on_pipes_the_countdown_is_plain_lines_and_a_picture_goes_to_a_file(tmp_path):
    with FakeBaomingServer(qr_picture=True) as server:
        proc = subprocess.Popen(
            [*COMMAND, "--card-name", "李四"],
            cwd=BASE,
            env=en_env(server, LEASESITE_VAR_DIR=str(tmp_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            login = waiting_login()
            # The command writes the picture just after it stores the waiting login: wait for it.
            deadline = time.monotonic() + 10
            while not (pictures := list((tmp_path / "qr-logins").glob("*.png"))) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [p.name for p in pictures] == [f"{login.pk}.png"]
            assert pictures[0].read_bytes().startswith(b"\x89PNG")
            assert pictures[0].stat().st_mode & 0o777 == 0o600
            fake_qr_scan(base_url=server.url, code=login.code)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    assert f"open {pictures[0]}" in out
    assert "\r" not in out and "\x1b[" not in out
    assert "Waiting for the scan" in out
    assert not pictures[0].exists()  # the picture is a login credential: gone with the command
    assert_clean(out + err)


def test_scan_refuses_a_user_name_and_needs_a_card_name():
    with pytest.raises(CommandError, match="--user-name comes from the WeChat login"):
        call_command("add_baoming_token", "--scan", "--card-name", "x", "--user-name", "y")
    with pytest.raises(CommandError, match="--card-name is required with --scan"):
        call_command("add_baoming_token", "--scan")
    with pytest.raises(CommandError, match="card name contains a control character"):
        call_command("add_baoming_token", "--scan", "--card-name", "bad\x07")
    assert not QrLogin.objects.exists()


def test_no_qr_code_at_first_keeps_the_countdown_going(qr_upstream):
    """pc_code failing at first: the command keeps trying (and says why) instead of dying."""
    qr_upstream.code_answers[:] = [
        answer("busy", 503),
        answer({"sta": 0, "msg": "ok", "data": {"qrcode": "https://qr.example/x", "code": "c1"}}),
    ]
    qr_upstream.login_answers[:] = [
        answer({"sta": -1, "msg": "please wait"}),
        answer({"sta": 0, "msg": "ok", "data": {"access_token": "ab" * 16, "uname": "脚本", "unionid": "o-s"}}),
    ]
    run = TerminalRun(subprocess_env(base_url=qr_upstream.url, DJANGO_LANGUAGE_CODE="en"), "--card-name", "x")
    code, output = run.finish()
    assert code == 0, output
    assert "Could not get a QR code yet (HTTP 503); trying again." in output
    assert BaomingToken.objects.get().user_name == "脚本"
    assert_clean(output)
