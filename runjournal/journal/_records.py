"""The records a journal stores: invocations and their entries."""

from __future__ import annotations

import enum

import attrs

__all__ = ["Entry", "EntryKind", "Failure", "Invocation", "InvocationStatus"]


class InvocationStatus(str, enum.Enum):
    """Where an invocation stands."""

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


class EntryKind(str, enum.Enum):
    """What produced an entry; replay refuses a mismatch."""

    RUN = "run"
    WAIT_FIRST = "wait_first"
    WAIT = "wait"


@attrs.frozen
class Failure:
    """A terminal failure as journaled: the error's type name and message."""

    type_name: str
    message: str


def _check_id(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty str, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{attribute.name} {value!r} is not valid Unicode (it holds a lone surrogate)"
        ) from None


@attrs.frozen
class Invocation:
    """One handler invocation: its input, status and outcome.

    ``version`` starts at 1 and grows by one with every successful
    compare-and-swap; engines own it.
    """

    id: str = attrs.field(validator=_check_id)
    handler: str = attrs.field(validator=_check_id)
    input: bytes
    codec: str
    status: InvocationStatus = InvocationStatus.PENDING
    output: bytes | None = None
    failure: Failure | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0


@attrs.frozen
class Entry:
    """One journaled step at ``index``: a payload on success, or a failure."""

    index: int = attrs.field(validator=attrs.validators.ge(0))
    kind: EntryKind
    name: str | None
    payload: bytes | None
    codec: str
    failure: Failure | None = None
    created_at: float = 0.0
    attempts: int = 1
