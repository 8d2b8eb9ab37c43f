"""Durations, ages and sizes as people type and read them: ``7d``, ``1.5s``, ``12.0 MB``."""

from __future__ import annotations

import math
import re
import time

__all__ = ["format_bytes", "format_clock", "format_seconds", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Seconds in ``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"250ms"``, ``"1h30m"`` or ``"45"``.

    Raises:
        ValueError: a one-line message saying what is accepted.
    """
    spelled = text.strip().lower()
    try:
        value = float(spelled)
    except ValueError:
        pass
    else:
        if math.isfinite(value) and value >= 0:
            return value
    total, at = 0.0, 0
    for match in _DURATION.finditer(spelled):
        if match.start() != at:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        at = match.end()
    if at == 0 or at != len(spelled):
        raise ValueError(
            f"bad duration {text!r}: write a number and a unit, e.g. 7d, 12h, 30m, 90s, "
            "250ms or 1h30m (plain numbers are seconds)"
        )
    return total


def format_seconds(value: float) -> str:
    """A short duration: ``3ms``, ``0.41s``, ``12.3s``, ``4m05s``, ``3h12m``, ``2d04h``."""
    value = max(0.0, value)
    if value < 1.0:
        return f"{value * 1000:.0f}ms" if value < 0.1 else f"{value:.2f}s"
    if value < 60:
        return f"{value:.1f}s"
    whole = int(value)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_clock(wall: float) -> str:
    """A wall-clock time in local time, to the millisecond: ``2024-05-01 12:00:00.123``."""
    if wall <= 0:
        return "-"
    millis = round((wall - math.floor(wall)) * 1000) % 1000
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) + f".{millis:03d}"


def format_bytes(size: int) -> str:
    """``512 B``, ``12.0 KB``, ``3.4 MB``, ``1.2 GB`` (powers of 1024)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
