"""What a running closure may know about its step: :func:`current_step`."""

from __future__ import annotations

import contextvars
import hashlib
from typing import Any

import attrs

from runjournal.context._errors import ContextMisuseError

__all__ = ["StepInfo", "current_step", "enter_step", "idempotency_key", "leave_step"]


@attrs.frozen
class StepInfo:
    """The step a closure runs for, from :func:`current_step`.

    Attributes:
        invocation_id: the invocation.
        index: the step's journal index.
        name: the step's name.
        attempt: this attempt's number, 1-based, counted across retries,
            crashes and workers (the count is journaled).
        idempotency_key: the same on every attempt, every replay and every
            worker: pass it to payment, email and other APIs that accept an
            idempotency key, so a step that runs twice (a crash after the
            side effect, before the journal write) has its effect once.
    """

    invocation_id: str
    index: int
    name: str | None
    attempt: int
    idempotency_key: str


def idempotency_key(invocation_id: str, index: int) -> str:
    """``rj-`` and 32 hex digits derived from the invocation id and step index.

    Short and plain enough for any API's key field (Stripe takes 255 characters).
    """
    digest = hashlib.blake2b(f"{invocation_id}\0{index}".encode(), digest_size=16)
    return f"rj-{digest.hexdigest()}"


# What current_step() builds its answer from: (invocation_id, index, name, attempt).
# A tuple, so the hot path (every closure call) builds no object it may not need.
_Raw = tuple[str, int, "str | None", int]
_current: contextvars.ContextVar[_Raw | None] = contextvars.ContextVar(
    "runjournal_step", default=None
)


def enter_step(invocation_id: str, index: int, name: str | None, attempt: int) -> Any:
    """Make the step what :func:`current_step` returns in this thread; a token for leave_step."""
    return _current.set((invocation_id, index, name, attempt))


def leave_step(token: Any) -> None:
    """Undo :func:`enter_step`."""
    _current.reset(token)


def current_step() -> StepInfo:
    """The step the calling closure runs for.

    Raises:
        ContextMisuseError: called outside a run closure (threads a closure
            starts do not inherit it; pass the value along).
    """
    raw = _current.get()
    if raw is None:
        raise ContextMisuseError(
            "current_step() was called outside a run closure; call it inside the function "
            "given to ctx.run / ctx.run_async (threads the closure starts do not see it: "
            "pass the StepInfo to them)"
        )
    invocation_id, index, name, attempt = raw
    return StepInfo(invocation_id, index, name, attempt, idempotency_key(invocation_id, index))
