from __future__ import annotations

import argparse

from django.core.exceptions import ValidationError
from django.core.validators import validate_email


def email_arg(value: str) -> str:
    value = value.strip().lower()
    try:
        validate_email(value)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid email address") from None
    return value


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number
