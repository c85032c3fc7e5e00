"""Logging filter that keeps secrets out of every log line."""

from __future__ import annotations

import logging
import re

from leasesite.crypto import mask_secret

# access_token=... in URLs (requests/urllib3 messages), and bare 32-hex 报名工具 tokens.
_QUERY_TOKEN = re.compile(r"(access_token=)([^&\s'\"]+)", re.IGNORECASE)
_HEX_TOKEN = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{32}(?![0-9a-fA-F])")


def scrub_secrets(text: str) -> str:
    text = _QUERY_TOKEN.sub(lambda m: m.group(0) if "…" in m.group(2) else m.group(1) + mask_secret(m.group(2)), text)
    return _HEX_TOKEN.sub(lambda m: mask_secret(m.group(0)), text)


class SecretScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a broken format string is not ours to fix here
            return True
        scrubbed = scrub_secrets(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_secrets(record.exc_text)
        if scrubbed != message or record.args:
            record.msg = scrubbed
            record.args = None
        return True


class ClientErrorOneLineFilter(logging.Filter):
    """``django.security.*`` records (an oversized body, a bad Host header, a forged session ...)
    are the client's doing and Django answers them with a 400: log them as one line, without the
    traceback Django attaches, so nobody can fill the log with tracebacks by sending junk."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("django.security."):
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


class StartupNoiseFilter(logging.Filter):
    """Drops start-up lines that tell a newcomer nothing, in processes that ``start`` supervises.

    kombu's "No hostname was supplied. Reverting to default 'localhost'" is logged on every broker
    connection of the embedded ``filesystem://`` transport, which has no host at all. ``leasesite.celery``
    attaches this filter to that one logger when ``LEASESITE_SUPERVISED=1`` and the broker is the
    filesystem one; a real broker URL without a host keeps the warning.
    """

    NOISE = ("No hostname was supplied. Reverting to default",)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        return not message.startswith(self.NOISE)
