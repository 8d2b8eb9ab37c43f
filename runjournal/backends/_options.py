"""Engine options: one converter for values given as URL query strings or as
Python values, with errors that name the engine, the option and the value.

Engines name their options as keyword-only parameters of ``from_url`` (None
meaning "the engine's default"), so the registry can refuse an unknown
option the same way for every engine, built-in or not; each engine then
converts what it was given with :func:`convert_options`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

__all__ = ["convert_options", "flag", "one_of", "seconds", "size", "text", "whole"]

Converter = Callable[[Any], Any]


def convert_options(engine: str, **given: tuple[Any, Converter]) -> dict[str, Any]:
    """Convert each ``name=(value, converter)`` whose value is not None.

    Raises:
        ValueError: a value the converter refuses; the message names the
            engine, the option and the value, and says what is accepted.
    """
    converted: dict[str, Any] = {}
    for name, (value, convert) in given.items():
        if value is None:
            continue
        try:
            converted[name] = convert(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the {engine}:// engine option {name}={value!r}: {exc}") from None
    return converted


def flag(value: Any) -> bool:
    """``True``/``False``, or one of 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text_value = str(value).strip().lower()
    if text_value in {"1", "true", "yes", "on"}:
        return True
    if text_value in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def whole(minimum: int) -> Converter:
    """A converter to an int >= ``minimum`` (from an int or its decimal text)."""

    def convert(value: Any) -> int:
        if isinstance(value, (bool, float)):
            raise ValueError(f"must be a whole number >= {minimum}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number >= {minimum}") from None
        if number < minimum:
            raise ValueError(f"must be a whole number >= {minimum}")
        return number

    return convert


def seconds(value: Any) -> float:
    """A positive number of seconds (from a number or its text)."""
    if isinstance(value, bool):
        raise ValueError("must be a positive number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a positive number of seconds") from None
    if not (number > 0 and math.isfinite(number)):
        raise ValueError("must be a positive number of seconds")
    return number


def text(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def one_of(*choices: str) -> Converter:
    """A converter accepting exactly one of ``choices``."""

    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)

    return convert


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def size(minimum: int) -> Converter:
    """A converter to a byte count >= ``minimum``: an int, or text like ``512MB``, ``2GiB``.

    Units are binary (``1MB`` is 2**20 bytes), as LMDB's map sizes are.
    """

    def convert(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            match = _SIZE.match(str(value))
            if not match:
                raise ValueError("is not a size; write bytes or e.g. '512MB', '2GiB'")
            unit = (match.group(2) or "b")[0].lower()
            number = int(match.group(1)) << {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]
        if number < minimum:
            raise ValueError(f"must be at least {_human(minimum)}")
        return number

    return convert


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
