from __future__ import annotations

import argparse

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from leasesite.cli import positive_int


def email_arg(value: str) -> str:
    value = value.strip().lower()
    try:
        validate_email(value)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid email address") from None
    return value


__all__ = ["email_arg", "positive_int"]
