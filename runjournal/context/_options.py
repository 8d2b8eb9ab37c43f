"""Per-run options: retry policy, at-most-once, and codec."""

from __future__ import annotations

import datetime
import math
import random
from collections.abc import Callable
from typing import Any

import attrs

from runjournal.journal import Codec, JSONCodec

__all__ = ["Duration", "RetryOn", "RunOptions", "resolve_options", "seconds"]

Duration = float | int | datetime.timedelta
#: Which exceptions a run retries: exception classes, or a predicate.
RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]


def _seconds(value: Duration | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a duration must be float seconds or datetime.timedelta, got {value!r}")
    return float(value)


def seconds(value: Duration, name: str) -> float:
    """A duration given as float seconds or timedelta, as float seconds >= 0.

    Raises:
        TypeError, ValueError: naming ``name``.
    """
    try:
        result = _seconds(value)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    if result is None or math.isnan(result) or result < 0:
        raise ValueError(f"{name} must be a duration >= 0, got {value!r}")
    return result


def _named_seconds(name: str, value: Duration) -> float:
    """``value`` as float seconds; a wrong type (None too) is refused naming the option."""
    try:
        result = _seconds(value)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    if result is None:
        raise TypeError(f"{name}: a duration must be float seconds or datetime.timedelta, got None")
    return result


# One converter per duration option (the attrs mypy plugin takes named functions only).
def _initial_retry_interval(value: Duration) -> float:
    return _named_seconds("initial_retry_interval", value)


def _max_retry_interval(value: Duration) -> float:
    return _named_seconds("max_retry_interval", value)


def _max_retry_duration(value: Duration | None) -> float | None:
    return None if value is None else _named_seconds("max_retry_duration", value)


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


def _check_jitter(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(f"jitter must be a fraction from 0 to 1, got {value!r}")


def _check_flag(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be True or False, got {value!r}")


def _retry_on(value: Any) -> tuple[type[BaseException], ...] | Callable[[Exception], bool] | None:
    """Exception classes become a tuple; a predicate stays; anything else is refused."""
    if value is None:
        return None
    if isinstance(value, type):
        value = (value,)
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
            return tuple(value)
        raise TypeError(
            f"retry_on takes exception classes (e.g. (ConnectionError, TimeoutError)) or a "
            f"predicate exc -> bool, got {value!r}"
        )
    if callable(value):
        return value  # type: ignore[no-any-return]
    raise TypeError(f"retry_on takes exception classes or a predicate exc -> bool, got {value!r}")


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
            than this after the first attempt; None for no limit. Counted
            from the first attempt's journaled start, across restarts.
        retry_on: which errors are retried: exception classes, or a
            predicate ``exc -> bool``; an error it rejects fails the step at
            once (journaled as a :class:`TerminalError` naming it). None
            (default) retries every ``Exception`` but ``TerminalError``.
        jitter: a fraction 0..1; each delay is drawn uniformly from
            ``[delay * (1 - jitter), delay]`` so a fleet does not retry in
            lock-step. 0 (default) keeps the exact schedule.
        at_most_once: never run an attempt twice, even across a crash: a
            start marker is journaled before each attempt (one more write),
            and an attempt that started but left no outcome counts as failed
            (:class:`StepInterrupted` when no retries remain).
        codec: encodes the result into the journal (JSON).
    """

    max_retry_attempts: int | None = attrs.field(default=None, validator=_check_attempts)
    initial_retry_interval: float = attrs.field(
        default=0.05, converter=_initial_retry_interval, validator=_non_negative
    )
    retry_interval_factor: float = attrs.field(default=2.0, validator=_check_factor)
    max_retry_interval: float = attrs.field(
        default=2.0, converter=_max_retry_interval, validator=_non_negative
    )
    max_retry_duration: float | None = attrs.field(
        default=None, converter=_max_retry_duration, validator=_non_negative
    )
    retry_on: tuple[type[BaseException], ...] | Callable[[Exception], bool] | None = attrs.field(
        default=None, converter=_retry_on
    )
    jitter: float = attrs.field(default=0.0, validator=_check_jitter)
    at_most_once: bool = attrs.field(default=False, validator=_check_flag)
    codec: Codec = attrs.field(factory=JSONCodec, validator=_check_codec)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry`` (1-based), capped, then jittered with ``rng``."""
        try:
            raw = self.initial_retry_interval * self.retry_interval_factor ** (retry - 1)
        except OverflowError:
            raw = math.inf
        capped = min(raw, self.max_retry_interval)
        if self.jitter and rng is not None:
            return rng.uniform(capped * (1 - self.jitter), capped)
        return capped

    def retries(self, exc: Exception) -> bool:
        """Whether ``exc`` (not a TerminalError) is retried under ``retry_on``."""
        if self.retry_on is None:
            return True
        if isinstance(self.retry_on, tuple):
            return isinstance(exc, self.retry_on)
        return bool(self.retry_on(exc))


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
