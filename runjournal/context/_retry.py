"""The retry loop: a policy, a clock to sleep on, and a switch to remove waits.

Kept free of journaling: it calls a closure until it returns, raises a
terminal error, or runs out of budget, and reports which.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from runjournal.context._errors import ContextMisuseError, TerminalError
from runjournal.context._options import RunOptions

__all__ = [
    "Clock",
    "RetryDetails",
    "SystemClock",
    "Succeeded",
    "call_with_retry",
    "is_testing",
    "set_testing",
]

log = logging.getLogger("runjournal")

_testing = threading.Event()


def set_testing(enabled: bool = True) -> None:
    """Turn retry waits off (True) or back on (False), process-wide.

    Retries still happen, and are still counted and logged; only the sleeps go.
    """
    if enabled:
        _testing.set()
    else:
        _testing.clear()


def is_testing() -> bool:
    """Whether :func:`set_testing` has turned retry waits off."""
    return _testing.is_set()


class Clock(Protocol):
    """Where the retry loop reads time and sleeps; tests pass a fake one."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@attrs.frozen
class RetryDetails:
    """What a retry hook is told about a failed attempt."""

    name: str | None
    attempt: int
    next_delay: float
    elapsed: float
    error: Exception


@attrs.frozen
class Succeeded:
    """The closure returned ``value`` after ``attempts`` attempts."""

    value: Any
    attempts: int


@attrs.frozen
class Failed:
    """The closure failed for good after ``attempts`` attempts with ``error``."""

    error: TerminalError
    attempts: int


RetryHook = Callable[[RetryDetails], None]


def call_with_retry(
    fn: Callable[[], Any],
    options: RunOptions,
    *,
    name: str | None,
    clock: Clock,
    on_retry: RetryHook | None = None,
) -> Succeeded | Failed:
    """Call ``fn`` until it returns or fails terminally.

    A :class:`TerminalError` ends the loop at once. Any other ``Exception``
    is retried after ``options.delay(k)``, until ``max_retry_attempts`` retries
    or ``max_retry_duration`` are used up, when it becomes a terminal error
    whose message keeps the original type and text. Misuse errors and
    ``BaseException`` (KeyboardInterrupt, SystemExit) propagate untouched.
    """
    start = clock.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            value = fn()
        except TerminalError as exc:
            return Failed(exc, attempt)
        except ContextMisuseError:
            raise
        except Exception as exc:
            delay = options.delay(attempt)
            elapsed = clock.monotonic() - start
            limit = _exhausted(options, attempt, elapsed + delay)
            if limit is not None:
                terminal = TerminalError(
                    f"run {name or '<unnamed>'!r} gave up after {attempt} attempt"
                    f"{'s' if attempt != 1 else ''} ({limit}): "
                    f"{type(exc).__qualname__}: {exc}"
                )
                terminal.__cause__ = exc
                return Failed(terminal, attempt)
            log.warning(
                "run %r attempt %d failed with %s: %s; retrying in %.3fs",
                name or "<unnamed>",
                attempt,
                type(exc).__qualname__,
                exc,
                delay,
            )
            if on_retry is not None:
                on_retry(RetryDetails(name, attempt, delay, elapsed, exc))
            if not _testing.is_set():
                clock.sleep(delay)
        else:
            return Succeeded(value, attempt)


def _exhausted(options: RunOptions, attempt: int, next_start: float) -> str | None:
    if options.max_retry_attempts is not None and attempt > options.max_retry_attempts:
        return f"max_retry_attempts={options.max_retry_attempts} exhausted"
    if options.max_retry_duration is not None and next_start > options.max_retry_duration:
        return f"max_retry_duration={options.max_retry_duration}s exhausted"
    return None
