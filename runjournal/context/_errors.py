"""Errors the run/retry core raises to handler code."""

from __future__ import annotations

import sys

from runjournal.journal import Failure

__all__ = [
    "ContextMisuseError",
    "HandlerNotFound",
    "InvocationMismatch",
    "InvocationTimeout",
    "LeaseLost",
    "NonDeterminismError",
    "StepInterrupted",
    "TerminalError",
]


class TerminalError(Exception):
    """A failure that must not be retried; it is journaled and re-raised on replay.

    Raise it (or a subclass) from a run closure or a handler. The journal keeps
    the error's type and message, so a replay re-raises an error of the same
    class (when that class is imported) with the same message; other
    attributes of a subclass are not journaled.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class StepInterrupted(TerminalError):
    """A step's attempt started and never finished (the worker stopped).

    Such an attempt is never run again: it counts as failed. When no retries
    remain, the step ends with this error, journaled. Every attempt of an
    at-most-once step is covered; of other steps, every attempt but the first.
    """


# Journaled (and shown by `runjournal show`) under the name users import them by.
TerminalError.__module__ = "runjournal"
StepInterrupted.__module__ = "runjournal"


class NonDeterminismError(RuntimeError):
    """The handler asked for a step that differs from the one journaled at that index."""

    def __init__(self, invocation_id: str, index: int, recorded: str, asked: str) -> None:
        super().__init__(
            f"invocation {invocation_id!r}, journal index {index}: the journal recorded "
            f"{recorded}, but the code now asks for {asked}. The handler must make the same "
            "ctx calls in the same order on every replay; move non-deterministic choices "
            "into ctx.run, or use a new invocation id"
        )
        self.invocation_id = invocation_id
        self.index = index
        self.recorded = recorded
        self.asked = asked


class ContextMisuseError(RuntimeError):
    """A ctx operation was called where it is not allowed (inside a run closure)."""


class LeaseLost(RuntimeError):
    """This worker no longer holds the invocation's lease; another worker took it over.

    Raised by the next ctx operation (before any closure starts) once the
    worker could not renew its lease in time (it stalled, or the journal was
    unreachable past its expiry) or was fenced by a takeover. It leaves the
    invocation to its new owner and is never retried inside ``run``.
    """

    def __init__(self, invocation_id: str, why: str) -> None:
        super().__init__(
            f"invocation {invocation_id!r}: this worker lost its lease ({why}); another worker "
            "runs it now, so this attempt stops without starting further steps"
        )
        self.invocation_id = invocation_id


class InvocationTimeout(TimeoutError):
    """``invoke(..., timeout=...)`` waited that long for another worker to finish the
    invocation; it is still running there (or pending)."""


class InvocationMismatch(ValueError):
    """An invocation id was re-used with another handler or another input."""


class HandlerNotFound(LookupError):
    """No handler is registered under that name on this Runtime."""


def qualified_name(cls: type) -> str:
    """``module:QualName``, the form failures are journaled under."""
    return f"{cls.__module__}:{cls.__qualname__}"


def failure_of(exc: BaseException) -> Failure:
    """The journaled form of a terminal error."""
    return Failure(qualified_name(type(exc)), str(exc))


def terminal_from(failure: Failure) -> TerminalError:
    """Rebuild the terminal error a journaled failure stands for.

    The class is looked up among modules already imported (never imported
    on the journal's say-so); it is created without calling its ``__init__``,
    whose signature may differ, so ``str(error)`` is the journaled message.
    Anything else becomes a plain :class:`TerminalError`.
    """
    module_name, _, qualname = failure.type_name.partition(":")
    target: object = sys.modules.get(module_name)
    for part in qualname.split(".") if target is not None else ():
        target = getattr(target, part, None)
    cls = target if isinstance(target, type) and issubclass(target, TerminalError) else None
    if cls is None:
        return TerminalError(failure.message)
    exc = cls.__new__(cls)
    Exception.__init__(exc, failure.message)
    return exc
