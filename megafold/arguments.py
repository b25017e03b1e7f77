"""argparse pieces shared by the ``megafold`` commands (``megafold.cli`` and
``megafold.precache.build.build_main``). It imports nothing from megafold, so any layer may
use it."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (status 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(text: str, minimum: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 0."""
    return _int_at_least(text, 0, "non-negative")


def positive_float(text: str) -> float:
    """An argparse ``type``: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def one_line(message: object) -> str:
    """An error message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(message).split())


def config_override(text: str) -> tuple[str, object]:
    """An argparse ``type``: ``FIELD=VALUE``, the value read as JSON where it parses (true, 4,
    0.5, "x") and kept as text otherwise (a word such as triton)."""
    import json

    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field.strip(), json.loads(value)
    except ValueError:
        return field.strip(), value
