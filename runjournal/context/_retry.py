"""The retry loop: a policy, a clock to sleep on, and a switch to remove waits.

Kept free of journaling. :class:`RetrySchedule` is the loop's state as a
small machine that says, after each failed attempt, whether to wait (and how
long) or to give up; :func:`call_with_retry` drives it for a plain function,
calling hooks where the caller journals (before an attempt, after a failure).
A step resumed after a crash starts the machine from its journaled progress,
so attempts already spent stay spent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs

from runjournal.context._errors import (
    ContextMisuseError,
    LeaseLost,
    StepInterrupted,
    TerminalError,
)
from runjournal.context._log import emit
from runjournal.context._options import RunOptions

__all__ = [
    "FRESH",
    "Clock",
    "Failed",
    "RetryDetails",
    "RetrySchedule",
    "Resume",
    "Succeeded",
    "SystemClock",
    "acall_with_retry",
    "call_with_retry",
    "is_testing",
    "set_testing",
]

_testing = threading.Event()

#: Errors that end an attempt at once and are never retried or journaled.
NOT_RETRIED: tuple[type[BaseException], ...] = (ContextMisuseError, LeaseLost)


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
    """What a retry hook is told about a failed attempt.

    Attributes:
        name: the step's name.
        attempt: the attempt that failed (1-based, counted across restarts).
        next_delay: the wait before the next attempt, in seconds.
        elapsed: seconds since the step's first attempt started.
        error: what the attempt raised.
        invocation_id: the invocation the step belongs to.
        index: the step's journal index.
    """

    name: str | None
    attempt: int
    next_delay: float
    elapsed: float
    error: Exception
    invocation_id: str | None = None
    index: int | None = None


@attrs.frozen
class Succeeded:
    """The closure returned ``value`` at attempt number ``attempts``."""

    value: Any
    attempts: int


@attrs.frozen
class Failed:
    """The step failed for good at attempt number ``attempts`` with ``error``."""

    error: TerminalError
    attempts: int


@attrs.frozen
class Resume:
    """Where a step's retries start: the attempts its journaled progress says are spent.

    Attributes:
        attempts: attempts already used (0 for a step never tried).
        elapsed: seconds since the first of them started.
        interrupted: the last of them started and never finished (a start
            marker without an outcome): it counts as failed.
        last_error: the last failure journaled, as ``Type: text``.
    """

    attempts: int = 0
    elapsed: float = 0.0
    interrupted: bool = False
    last_error: str | None = None


RetryHook = Callable[[RetryDetails], None]
#: Where a step never tried starts.
FRESH = Resume()


class RetrySchedule:
    """The retry state of one step: which attempt is next, and whether to go on.

    Sync and async drivers share it: they call :meth:`begin` before each
    attempt and :meth:`failed` after each retryable failure, and sleep for
    the delay it returns (or stop with the :class:`Failed` it returns).

    Args:
        options: the step's retry policy.
        name: the step's name, for messages.
        clock: where elapsed time is read.
        resume: the attempts already spent (after a restart).
        rng: draws jitter.
        on_retry: called with a :class:`RetryDetails` after each failed attempt
            that will be retried.
        invocation_id, index, handler: where the step is, for messages, logs and hooks.
    """

    __slots__ = (
        "_clock",
        "_index",
        "_invocation_id",
        "_on_retry",
        "_rng",
        "_started",
        "attempt",
        "handler",
        "name",
        "options",
    )

    def __init__(
        self,
        options: RunOptions,
        *,
        name: str | None,
        clock: Clock,
        resume: Resume = FRESH,
        rng: random.Random | None = None,
        on_retry: RetryHook | None = None,
        invocation_id: str | None = None,
        index: int | None = None,
        handler: str | None = None,
    ) -> None:
        self.options = options
        self.handler = handler
        self.name = name
        self.attempt = resume.attempts
        self._clock = clock
        self._started = clock.monotonic() - resume.elapsed
        self._rng = rng
        self._on_retry = on_retry
        self._invocation_id = invocation_id
        self._index = index

    @property
    def label(self) -> str:
        """How the step is named in messages."""
        where = (
            f" (invocation {self._invocation_id!r}, index {self._index})"
            if self._invocation_id is not None
            else ""
        )
        return f"run {self.name or '<unnamed>'!r}{where}"

    def elapsed(self) -> float:
        """Seconds since the first attempt started."""
        return self._clock.monotonic() - self._started

    def begin(self) -> int:
        """Start the next attempt; return its number (1-based)."""
        self.attempt += 1
        return self.attempt

    def interrupted(self) -> Failed | None:
        """Count the last journaled attempt, started and never finished, as failed.

        Returns the step's end if no retries remain, else None (run the next).
        """
        limit = self._exhausted(self.elapsed())
        if limit is None:
            return None
        error = StepInterrupted(
            f"{self.label}: attempt {self.attempt} started and never finished (its worker "
            f"stopped); it counts as failed and no retries remain ({limit})"
        )
        return Failed(error, self.attempt)

    def resumed(self, resume: Resume) -> Failed | None:
        """The step resumes after its worker stopped: its end if no retries remain, else None.

        An interrupted last attempt counts as failed (:meth:`interrupted`); after
        a failed one the next attempt would start now, so ``max_retry_duration``
        may have run out while no worker ran the step.
        """
        if resume.interrupted:
            return self.interrupted()
        limit = self._exhausted(self.elapsed())
        if limit is None:
            return None
        attempt = self.attempt
        terminal = TerminalError(
            f"{self.label} gave up after {attempt} attempt{'s' if attempt != 1 else ''} "
            f"({limit}): {resume.last_error or 'its last attempt failed'}"
        )
        return Failed(terminal, attempt)

    def failed(self, exc: Exception) -> float | Failed:
        """Attempt :attr:`attempt` raised ``exc`` (not a TerminalError).

        Returns the delay before the next attempt, or the step's terminal end:
        ``retry_on`` rejects ``exc``, or the budget is spent.
        """
        attempt = self.attempt
        if not self.options.retries(exc):
            return self._give_up(exc, "not retried: retry_on rejects it")
        delay = self.options.delay(attempt, self._rng)
        elapsed = self.elapsed()
        limit = self._exhausted(elapsed + delay)
        if limit is not None:
            return self._give_up(exc, limit)
        emit(
            logging.WARNING,
            "%s attempt %d failed with %s: %s; retrying in %.3fs",
            self.label,
            attempt,
            type(exc).__qualname__,
            exc,
            delay,
            invocation_id=self._invocation_id,
            handler=self.handler,
            step=self.name,
            index=self._index,
            attempt=attempt,
        )
        if self._on_retry is not None:
            self._on_retry(
                RetryDetails(
                    self.name, attempt, delay, elapsed, exc, self._invocation_id, self._index
                )
            )
        return delay

    def _give_up(self, exc: Exception, why: str) -> Failed:
        attempt = self.attempt
        terminal = TerminalError(
            f"{self.label} gave up after {attempt} attempt{'s' if attempt != 1 else ''} "
            f"({why}): {type(exc).__qualname__}: {exc}"
        )
        terminal.__cause__ = exc
        return Failed(terminal, attempt)

    def _exhausted(self, next_start: float) -> str | None:
        options = self.options
        if options.max_retry_attempts is not None and self.attempt > options.max_retry_attempts:
            return f"max_retry_attempts={options.max_retry_attempts} exhausted"
        if options.max_retry_duration is not None and next_start > options.max_retry_duration:
            return f"max_retry_duration={options.max_retry_duration}s exhausted"
        return None


def call_with_retry(
    fn: Callable[[int], Any],
    schedule: Callable[[Resume], RetrySchedule],
    *,
    resume: Resume = FRESH,
    clock: Clock,
    before_attempt: Callable[[int], None] | None = None,
    after_failure: Callable[[int, Exception], None] | None = None,
) -> Succeeded | Failed:
    """Call ``fn(attempt)`` until it returns or fails terminally.

    A :class:`TerminalError` ends the loop at once. Any other ``Exception``
    goes to the schedule's ``failed``: retried after the delay it gives, or
    ended as a terminal error whose message keeps the original type and text.
    Misuse and lease errors and ``BaseException`` (KeyboardInterrupt,
    SystemExit) propagate untouched.

    Args:
        fn: the closure, given its attempt number.
        schedule: builds the step's retry state from where it resumes; a
            step that succeeds at its first attempt never needs one.
        resume: the attempts already spent; when ``resume.interrupted``, the
            last of them is counted as failed first (a step after a crash).
            A resumed step whose budget ran out meanwhile runs nothing.
        clock: where the waits sleep (no waits under :func:`set_testing`).
        before_attempt: called with the attempt number before each attempt
            (where a start marker is journaled).
        after_failure: called before waiting for a retry (where the failed
            attempt is journaled).
    """
    failure: Exception | None = None
    if resume is FRESH:
        # The common case, kept lean: one attempt that succeeds.
        started = clock.monotonic()
        if before_attempt is not None:
            before_attempt(1)
        try:
            return Succeeded(fn(1), 1)
        except TerminalError as exc:
            return Failed(exc, 1)
        except NOT_RETRIED:
            raise
        except Exception as exc:
            failure = exc
        state = schedule(Resume(elapsed=clock.monotonic() - started))
        state.begin()
    else:
        state = schedule(resume)
        ended = state.resumed(resume)
        if ended is not None:
            return ended
    while True:
        if failure is None:
            attempt = state.begin()
            if before_attempt is not None:
                before_attempt(attempt)
            try:
                return Succeeded(fn(attempt), attempt)
            except TerminalError as exc:
                return Failed(exc, attempt)
            except NOT_RETRIED:
                raise
            except Exception as exc:
                failure = exc
        step = state.failed(failure)
        if isinstance(step, Failed):
            return step
        if after_failure is not None:
            after_failure(state.attempt, failure)
        failure = None
        if not _testing.is_set():
            clock.sleep(step)


async def acall_with_retry(
    fn: Callable[[int], Awaitable[Any]],
    schedule: Callable[[Resume], RetrySchedule],
    *,
    resume: Resume = FRESH,
    clock: Clock,
    sleep: Callable[[float], Awaitable[None]],
    before_attempt: Callable[[int], Awaitable[None] | None] | None = None,
    after_failure: Callable[[int, Exception], Awaitable[None] | None] | None = None,
    first_failure: tuple[Exception, float] | None = None,
) -> Succeeded | Failed:
    """:func:`call_with_retry` for async steps: the same schedule, and waits through
    ``sleep`` (``asyncio.sleep``) so the event loop runs on. The hooks return what to
    await, or None when there is nothing to wait for (the common case, kept cheap).

    ``first_failure``: attempt 1 already ran (the caller's fast path) and raised
    this, that many seconds after it started.
    """
    failure: Exception | None = None
    if first_failure is not None:
        failure, elapsed = first_failure
        state = schedule(Resume(elapsed=elapsed))
        state.begin()
    elif resume is FRESH:
        started = clock.monotonic()
        if before_attempt is not None:
            pending = before_attempt(1)
            if pending is not None:
                await pending
        try:
            return Succeeded(await fn(1), 1)
        except TerminalError as exc:
            return Failed(exc, 1)
        except NOT_RETRIED:
            raise
        except Exception as exc:
            failure = exc
        state = schedule(Resume(elapsed=clock.monotonic() - started))
        state.begin()
    else:
        state = schedule(resume)
        ended = state.resumed(resume)
        if ended is not None:
            return ended
    while True:
        if failure is None:
            attempt = state.begin()
            if before_attempt is not None:
                pending = before_attempt(attempt)
                if pending is not None:
                    await pending
            try:
                return Succeeded(await fn(attempt), attempt)
            except TerminalError as exc:
                return Failed(exc, attempt)
            except NOT_RETRIED:
                raise
            except Exception as exc:
                failure = exc
        step = state.failed(failure)
        if isinstance(step, Failed):
            return step
        if after_failure is not None:
            pending = after_failure(state.attempt, failure)
            if pending is not None:
                await pending
        failure = None
        if not _testing.is_set():
            await sleep(step)
