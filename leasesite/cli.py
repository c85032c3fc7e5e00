"""Argument types shared by the management commands of every app.

Every number a person types has an upper bound that the code behind it can handle: a huge
``--days`` must be a clear "at most ..." message, never an OverflowError or a database DataError.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# Upper bounds the commands use (named, so a command's help and its check agree).
MAX_DAYS = 36_500  # 100 years: timedelta and every database handle it
MAX_HOURS = 24.0 * 366  # --interval: at most a year between scheduled runs
MAX_MINUTES = int(MAX_HOURS * 60)  # --interval-minutes: the same year
MAX_MONTHS = 1_200  # terms and entitlements (PositiveSmallIntegerField holds 32767)
MAX_COUNT = 1_000_000  # generic counts (seats, benchmark sizes)


def int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [minimum, maximum], with a precise message otherwise."""

    def parse(value: str) -> int:
        text = value.strip()
        # int() of a 5000-digit string raises ValueError (Python's digit limit): same message.
        try:
            number = int(text) if len(text) <= 30 else None
        except ValueError:
            number = None
        if number is None:
            if text.lstrip("+-").isdigit():
                raise argparse.ArgumentTypeError(f"must be at most {maximum}, got a {len(text)}-digit number")
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value[:40]!r}")
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        if number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {number}")
        return number

    parse.__name__ = "whole number"  # argparse names the type in its "invalid ... value" message
    return parse


def float_between(minimum_exclusive: float, maximum: float) -> Callable[[str], float]:
    """An argparse type: a finite number > minimum_exclusive and <= maximum."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value[:40]!r}") from None
        if not math.isfinite(number) or number <= minimum_exclusive:
            raise argparse.ArgumentTypeError(f"must be a number above {minimum_exclusive:g}, got {value[:40]}")
        if number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value[:40]}")
        return number

    parse.__name__ = "number"
    return parse


positive_int = int_between(1, MAX_COUNT)
days_arg = int_between(1, MAX_DAYS)
months_arg = int_between(1, MAX_MONTHS)
hours_arg = float_between(0.0, MAX_HOURS)
minutes_arg = int_between(1, MAX_MINUTES)
