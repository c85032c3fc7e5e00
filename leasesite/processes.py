"""Helpers for ``start``'s supervisor: children that die with it, free ports, waiting for the web server."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The pid of the process that last forked, recorded just before the fork (in the parent), so a
# child can tell whether that parent died before it asked to be signalled.
_forking_pid: int | None = None


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


_LIBC = None
if sys.platform.startswith("linux"):
    os.register_at_fork(before=_remember_forking_pid)
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded now, not in the child between fork and exec


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive its parent, even a parent killed with SIGKILL.

    On Linux the kernel sends the child SIGTERM when its parent dies (``PR_SET_PDEATHSIG``; kept across
    ``exec``). Elsewhere it does nothing. Runs in the child between fork and exec, so it only calls libc.
    """
    if _LIBC is None:
        return
    if _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # the child still runs; the supervisor's own clean-up remains
    # The parent may have died between the fork and the prctl call: then no signal will come.
    if _forking_pid is not None and os.getppid() != _forking_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port`` now (``errno.EADDRINUSE``: something holds it), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As http.server does: sockets in TIME_WAIT from an earlier run do not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def port_in_use(host: str, port: int) -> bool:
    error = bind_error(host, port)
    return error is not None and error.errno == errno.EADDRINUSE


def loopback_for(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine (a wildcard address means loopback)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - only a translation, nothing binds here
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def http_get_status(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str] | None:
    """Status and (start of the) body of a GET, or None when nothing answers. No proxy is involved."""
    connection = http.client.HTTPConnection(loopback_for(host), port, timeout=timeout)
    try:
        # 127.0.0.1 is always in ALLOWED_HOSTS (settings), whichever address the server listens on.
        connection.request("GET", path, headers={"Host": "127.0.0.1"})
        response = connection.getresponse()
        return response.status, response.read(500).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        with contextlib.suppress(OSError):
            connection.close()
