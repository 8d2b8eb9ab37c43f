"""The records a journal stores: invocations and their entries."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

__all__ = [
    "Entry",
    "EntryKind",
    "Failure",
    "Invocation",
    "InvocationStatus",
    "Lease",
    "StepProgress",
]


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
class Lease:
    """Who may run an invocation: a worker, since a takeover.

    A lease is data on the invocation record, changed only by compare-and-swap.
    It is held while ``expires_at`` (wall-clock seconds) is in the future, or
    while the owner's liveness record, renewed by its heartbeat, says the same
    incarnation of that worker is alive.

    Attributes:
        owner: the worker id.
        incarnation: the owner's incarnation when it took the lease; a worker
            fenced by a takeover (or restarted) has a new one, so leases taken
            under the old one are void.
        epoch: grows with every takeover of this invocation (a fencing token).
        expires_at: the lease holds at least until then.
    """

    owner: str
    incarnation: int
    epoch: int
    expires_at: float


@attrs.frozen
class StepProgress:
    """What is durable about a step that has no journaled outcome yet.

    Attributes:
        index: the step's journal index.
        attempts: attempts begun so far that ended without an outcome (failed,
            or, when ``in_flight``, started and never finished).
        first_started_at: when the first attempt started (wall-clock seconds),
            so ``max_retry_duration`` survives a restart.
        in_flight: attempt number ``attempts`` was started (the start marker
            of a retry, or of any attempt of an at-most-once step) and has no
            outcome.
        last_error: the last failure, for people looking at the journal.
    """

    index: int = attrs.field(validator=attrs.validators.ge(0))
    attempts: int = attrs.field(validator=attrs.validators.ge(0))
    first_started_at: float
    in_flight: bool = False
    last_error: Failure | None = None


def _steps(steps: Iterable[StepProgress]) -> tuple[StepProgress, ...]:
    return tuple(steps)


@attrs.frozen
class Invocation:
    """One handler invocation: its input, status and outcome.

    ``version`` starts at 1 and grows by one with every successful
    compare-and-swap; engines own it. ``lease`` names the worker running it;
    ``steps`` the progress of steps whose outcome is not journaled yet
    (sorted by index).
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
    lease: Lease | None = None
    steps: tuple[StepProgress, ...] = attrs.field(default=(), converter=_steps)

    def progress(self, index: int) -> StepProgress | None:
        """The durable progress of the step at ``index``, if any."""
        for step in self.steps:
            if step.index == index:
                return step
        return None

    def with_progress(self, progress: StepProgress) -> Invocation:
        """This record with ``progress`` replacing the step's progress."""
        others = [step for step in self.steps if step.index != progress.index]
        return attrs.evolve(self, steps=sorted([*others, progress], key=_by_index))


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


def _by_index(step: StepProgress) -> int:
    return step.index
