"""Per-run options: retry policy and codec."""

from __future__ import annotations

import datetime
import math
from typing import Any

import attrs

from runjournal.journal import Codec, JSONCodec

__all__ = ["Duration", "RunOptions", "resolve_options"]

Duration = float | int | datetime.timedelta


def _seconds(value: Duration | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a duration must be float seconds or datetime.timedelta, got {value!r}")
    return float(value)


def _required_seconds(value: Duration) -> float:
    seconds = _seconds(value)
    assert seconds is not None
    return seconds


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and (math.isnan(value) or value < 0):
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _check_attempts(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(
            f"max_retry_attempts must be a whole number >= 0 (0 = run once), got {value!r}"
        )


def _check_factor(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 1:
        raise ValueError(f"retry_interval_factor must be a number >= 1, got {value!r}")


def _check_codec(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Codec):
        raise TypeError(
            f"codec must provide name, encode() and decode() (journal.Codec), got {value!r}"
        )


@attrs.frozen(kw_only=True)
class RunOptions:
    """How a run retries and encodes its result; reusable via ``options=``.

    Durations are float seconds or :class:`datetime.timedelta`.

    Attributes:
        max_retry_attempts: retries after the first attempt; 0 runs once;
            None retries until ``max_retry_duration`` (or forever).
        initial_retry_interval: the delay before the first retry (50 ms).
        retry_interval_factor: each delay is the previous one times this (2.0).
        max_retry_interval: delays are capped here (2 s).
        max_retry_duration: give up once the next retry would start later
            than this after the first attempt; None for no limit.
        codec: encodes the result into the journal (JSON).
    """

    max_retry_attempts: int | None = attrs.field(default=None, validator=_check_attempts)
    initial_retry_interval: float = attrs.field(
        default=0.05, converter=_required_seconds, validator=_non_negative
    )
    retry_interval_factor: float = attrs.field(default=2.0, validator=_check_factor)
    max_retry_interval: float = attrs.field(
        default=2.0, converter=_required_seconds, validator=_non_negative
    )
    max_retry_duration: float | None = attrs.field(
        default=None, converter=_seconds, validator=_non_negative
    )
    codec: Codec = attrs.field(factory=JSONCodec, validator=_check_codec)

    def delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1-based), capped."""
        try:
            raw = self.initial_retry_interval * self.retry_interval_factor ** (retry - 1)
        except OverflowError:
            raw = math.inf
        return min(raw, self.max_retry_interval)


_FIELDS = frozenset(a.name for a in attrs.fields(RunOptions))


def resolve_options(
    base: RunOptions, options: RunOptions | None, overrides: dict[str, Any]
) -> RunOptions:
    """``options`` (or ``base``) with keyword ``overrides`` applied."""
    chosen = base if options is None else options
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"options must be a RunOptions, got {type(options).__name__}")
    if not overrides:
        return chosen
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise TypeError(
            f"unknown run option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(_FIELDS))}"
        )
    return attrs.evolve(chosen, **overrides)
