"""Test your own handlers: pytest fixtures, and crashes simulated at a chosen step.

This module is a pytest plugin, loaded automatically when runjournal is
installed (entry-point group ``pytest11``, name ``runjournal``). Fixtures:

``runjournal_runtime``
    A :class:`~context.Runtime` on a fresh in-memory journal, with retry waits
    off (:func:`~context.set_testing`); closed after the test.
``runjournal_backend``
    That runtime's journal, to look at what was recorded.
``runjournal_crash``
    :func:`crash_and_rerun` bound to ``runjournal_runtime``.
``runjournal_testing``
    Only turns retry waits off for the test (retries still happen).

Register the handler under test on the fixture's runtime, then crash it::

    from context.testing import CrashReport

    def test_the_card_is_charged_once(runjournal_runtime, runjournal_crash):
        runjournal_runtime.handler("orders.process")(process_order)
        report = runjournal_crash("orders.process", {"id": 42}, step="charge-card")
        assert report.called_again == ()
        assert report.output == {"status": "shipped"}

The crash machinery is engine-agnostic: :class:`CrashingBackend` wraps any
:class:`journal.JournalBackend` and raises :class:`SimulatedCrash` at one
journal step, which ends the invocation attempt like a killed process would
(nothing after that write happens; what is durable stays durable).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs
import pytest

from context._retry import is_testing, set_testing
from context._runtime import Runtime
from journal import Capabilities, Entry, Invocation, InvocationStatus, JournalBackend

__all__ = [
    "CrashHelper",
    "CrashReport",
    "CrashingBackend",
    "SimulatedCrash",
    "crash_and_rerun",
    "runjournal_backend",
    "runjournal_crash",
    "runjournal_runtime",
    "runjournal_testing",
]


def _describe(entry: Entry) -> str:
    label = repr(entry.name) if entry.name is not None else "unnamed"
    return f"journal index {entry.index} ({label} {entry.kind.value})"


class SimulatedCrash(BaseException):
    """The process "died" at a journal step (raised by :class:`CrashingBackend`).

    A ``BaseException``, like ``KeyboardInterrupt``: retries, ``except
    Exception`` in handlers and ``Runtime.recover`` let it through, so the
    invocation attempt ends where the crash happened.

    Attributes:
        entry: the entry being written when the crash happened.
        durable: whether that entry reached the journal before the crash.
    """

    def __init__(self, entry: Entry, durable: bool) -> None:
        if durable:
            what = f"simulated crash right after {_describe(entry)} was made durable"
        else:
            what = (
                f"simulated crash while writing {_describe(entry)}: the step ran, "
                "but its outcome never reached the journal"
            )
        super().__init__(what)
        self.entry = entry
        self.durable = durable


def _check_step(step: object) -> int | str:
    if isinstance(step, bool) or not isinstance(step, (int, str)):
        raise TypeError(f"step must be a journal index (int) or a step name (str), got {step!r}")
    if isinstance(step, int) and step < 0:
        raise ValueError(f"step must be a journal index >= 0, got {step}")
    return step


class CrashingBackend:
    """A :class:`journal.JournalBackend` wrapper that crashes at one journal step.

    It passes every call to ``inner``, and records each entry it is asked to
    append. When armed, the first append that matches ``step`` — by journal
    index (int, 0-based, as in error messages) or by step name (str) —
    raises :class:`SimulatedCrash`, then the wrapper disarms itself:

    - ``lose_entry=False``: right after the entry is durable (the step is
      recorded; a re-run must not call its closure again);
    - ``lose_entry=True``: instead of writing it (the closure ran, its
      outcome is lost; a re-run calls it again: at-least-once).

    Args:
        inner: the journal to wrap; closing the wrapper closes it.
        step: where to crash; None leaves the wrapper disarmed (see :meth:`arm`).
        lose_entry: crash before the entry is written rather than after.
    """

    def __init__(
        self, inner: JournalBackend, *, step: int | str | None = None, lose_entry: bool = False
    ) -> None:
        self.inner = inner
        self.appended: list[Entry] = []
        self.crashed: SimulatedCrash | None = None
        self._step: int | str | None = None
        self._lose_entry = False
        self._lock = threading.Lock()
        if step is not None:
            self.arm(step, lose_entry=lose_entry)

    def arm(self, step: int | str, *, lose_entry: bool = False) -> None:
        """Crash at the next append matching ``step`` (see the class docstring)."""
        step = _check_step(step)
        with self._lock:
            self._step = step
            self._lose_entry = lose_entry

    @property
    def armed(self) -> bool:
        """Whether a crash is still to come."""
        return self._step is not None

    def _matches(self, entry: Entry) -> bool:
        step = self._step
        if step is None:
            return False
        return entry.name == step if isinstance(step, str) else entry.index == step

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        return self.inner.create_invocation(invocation)

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        return self.inner.get_invocation(invocation_id)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        return self.inner.update_invocation(invocation)

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        return self.inner.read_entries(invocation_id, start)

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        with self._lock:
            self.appended.append(entry)
            crash = self._matches(entry)
            lose = self._lose_entry
            if crash:
                self._step = None  # one crash per arming
        if crash and lose:
            self.crashed = SimulatedCrash(entry, durable=False)
            raise self.crashed
        self.inner.append_entry(invocation_id, entry)
        if crash:
            self.crashed = SimulatedCrash(entry, durable=True)
            raise self.crashed

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        return self.inner.list_invocations(status)

    def delete_invocation(self, invocation_id: str) -> bool:
        return self.inner.delete_invocation(invocation_id)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> CrashingBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"step={self._step!r}" if self._step is not None else "disarmed"
        return f"CrashingBackend({self.inner!r}, {state})"


@attrs.frozen
class CrashReport:
    """What :func:`crash_and_rerun` saw.

    A step counts as *run* in an attempt when that attempt asked the journal
    to record its outcome (its closure ran to a result or a terminal
    failure), so a closure that was retried counts once.

    Attributes:
        invocation_id: the invocation that was crashed and re-run.
        crash: the :class:`SimulatedCrash` that ended the first run.
        first_run: the entries the first run wrote, in order, including the
            one lost in the crash (when ``lose_entry``).
        rerun: the entries the re-run wrote, in order.
        output: what the re-run returned.
    """

    invocation_id: str
    crash: SimulatedCrash
    first_run: tuple[Entry, ...]
    rerun: tuple[Entry, ...]
    output: Any

    @property
    def called_again(self) -> tuple[Entry, ...]:
        """The re-run's entries for steps the first run had already run.

        Empty when the crash came after the step was durable; the crashed
        step alone when its outcome was lost (``lose_entry=True``).
        """
        seen = {entry.index for entry in self.first_run}
        return tuple(entry for entry in self.rerun if entry.index in seen)

    @property
    def replayed(self) -> tuple[int, ...]:
        """Journal indexes the re-run took from the journal instead of running."""
        again = {entry.index for entry in self.rerun}
        return tuple(sorted({e.index for e in self.first_run} - again))

    @property
    def resumed(self) -> tuple[Entry, ...]:
        """The re-run's entries for steps the first run never reached."""
        seen = {entry.index for entry in self.first_run}
        return tuple(entry for entry in self.rerun if entry.index not in seen)


def crash_and_rerun(
    runtime: Runtime,
    handler: str | Callable[..., Any],
    input: Any = None,
    *,
    step: int | str,
    lose_entry: bool = False,
    invocation_id: str | None = None,
) -> CrashReport:
    """Invoke ``handler``, crash it at ``step``, invoke it again; report what ran twice.

    ``runtime.backend`` is wrapped in a :class:`CrashingBackend` for the two
    runs and restored afterwards. The re-run is ``runtime.invoke`` with the
    same input and invocation id, as a restarted worker would do.

    Args:
        runtime: the Runtime the handler is registered on (any engine).
        handler: the handler's name, or the function.
        input: the handler's input.
        step: the journal index (int, 0-based) or step name (str) to crash at.
        lose_entry: crash before that step's outcome is written (the re-run
            calls its closure again) instead of right after.
        invocation_id: defaults to a new unique id.

    Returns:
        A :class:`CrashReport`; its ``output`` is what the re-run returned.

    Raises:
        AssertionError: the first run ended without reaching ``step``.
        Exception: whatever either run raised other than the simulated crash
            (a ``TerminalError`` the handler fails with, for instance).
    """
    inv_id = invocation_id if invocation_id is not None else f"crash-test-{uuid.uuid4().hex}"
    original = runtime.backend
    crashing = CrashingBackend(original, step=step, lose_entry=lose_entry)
    runtime.backend = crashing
    try:
        try:
            runtime.invoke(handler, input, invocation_id=inv_id)
        except SimulatedCrash as exc:
            if exc is not crashing.crashed:
                raise  # another CrashingBackend's crash: not ours to handle
            crash = exc
            first_run = tuple(crashing.appended)
        else:
            written = ", ".join(_describe(e) for e in crashing.appended) or "nothing"
            raise AssertionError(
                f"invocation {inv_id!r} finished without reaching step {step!r}, so no crash "
                f"was simulated; it journaled: {written}"
            )
        del crashing.appended[:]
        output = runtime.invoke(handler, input, invocation_id=inv_id)
        rerun = tuple(crashing.appended)
    finally:
        runtime.backend = original
    return CrashReport(inv_id, crash, first_run, rerun, output)


class CrashHelper(Protocol):
    """The ``runjournal_crash`` fixture: :func:`crash_and_rerun` on ``runjournal_runtime``."""

    def __call__(
        self,
        handler: str | Callable[..., Any],
        input: Any = None,
        *,
        step: int | str,
        lose_entry: bool = False,
        invocation_id: str | None = None,
    ) -> CrashReport: ...


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def runjournal_testing() -> Iterator[None]:
    """Retry waits off for this test (retries still happen); restored afterwards."""
    was = is_testing()
    set_testing(True)
    try:
        yield
    finally:
        set_testing(was)


@pytest.fixture
def runjournal_runtime(runjournal_testing: None) -> Iterator[Runtime]:
    """A Runtime on a fresh in-memory journal, retry waits off; closed afterwards."""
    runtime = Runtime("memory://")
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture
def runjournal_backend(runjournal_runtime: Runtime) -> JournalBackend:
    """The journal of ``runjournal_runtime``, to inspect what was recorded."""
    return runjournal_runtime.backend


@pytest.fixture
def runjournal_crash(runjournal_runtime: Runtime) -> CrashHelper:
    """:func:`crash_and_rerun` bound to ``runjournal_runtime``."""

    def crash(
        handler: str | Callable[..., Any],
        input: Any = None,
        *,
        step: int | str,
        lose_entry: bool = False,
        invocation_id: str | None = None,
    ) -> CrashReport:
        return crash_and_rerun(
            runjournal_runtime,
            handler,
            input,
            step=step,
            lose_entry=lose_entry,
            invocation_id=invocation_id,
        )

    return crash
