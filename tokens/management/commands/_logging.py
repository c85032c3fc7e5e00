"""Shared log setup for the token commands: ``--verbose`` and ``--log-file``."""

from __future__ import annotations

import logging

from leasesite.log_filters import SecretScrubFilter


def configure_command_logging(*, verbose: bool, log_file: str | None) -> logging.Handler | None:
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("tokens", "leasesite"):
        logging.getLogger(name).setLevel(level)
    if not log_file:
        return None
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(SecretScrubFilter())
    handler.setLevel(level)
    logging.getLogger("tokens").addHandler(handler)
    logging.getLogger("leasesite.alerts").addHandler(handler)
    return handler
