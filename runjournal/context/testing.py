"""Test your own handlers: crashes simulated at a chosen journal step.

Needs nothing but runjournal (not pytest). The pytest plugin runjournal
installs (entry point ``pytest11``, ``runjournal``) binds these to fixtures:
``runjournal_runtime``, ``runjournal_backend``, ``runjournal_crash`` and
``runjournal_testing``.

Register the handler under test on the fixture's runtime, then crash it::

    def test_the_card_is_charged_once(runjournal_runtime, runjournal_crash):
        runjournal_runtime.handler("orders.process")(process_order)
        report = runjournal_crash("orders.process", {"id": 42}, step="charge-card")
        assert report.called_again == ()
        assert report.output == {"status": "shipped"}

The crash machinery is engine-agnostic: :class:`CrashingBackend` wraps any
:class:`runjournal.journal.JournalBackend` and raises :class:`SimulatedCrash` at one
journal step, which ends the invocation attempt like a killed process would:
from then on that client refuses every call, from any thread, and what was
durable stays durable.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs

from runjournal.context._runtime import Runtime
from runjournal.journal import (
    Capabilities,
    Entry,
    EntryKind,
    Invocation,
    InvocationStatus,
    JournalBackend,
)

__all__ = [
    "CrashHelper",
    "CrashReport",
    "CrashingBackend",
    "SimulatedCrash",
    "crash_and_rerun",
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


def _check_step(step: object) -> int | str | None:
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (int, str)):
        raise TypeError(f"step must be a journal index (int) or a step name (str), got {step!r}")
    if isinstance(step, int) and step < 0:
        raise ValueError(f"step must be a journal index >= 0, got {step}")
    return step


class CrashingBackend:
    """A :class:`runjournal.journal.JournalBackend` wrapper that crashes at one journal step.

    It passes every call to ``inner`` and records each entry it is asked to
    append. The first append matching ``step`` — by journal index (int,
    0-based, as in error messages) or by step name (str) — raises
    :class:`SimulatedCrash`:

    - ``lose_entry=False``: right after the entry is durable (the step is
      recorded; a re-run must not call its closure again);
    - ``lose_entry=True``: instead of writing it (the closure ran, its
      outcome is lost; a re-run calls it again: at-least-once).

    From then on the wrapper is a dead process: every call raises
    :class:`SimulatedCrash` and writes nothing, whichever thread makes it (a
    ``run_async`` closure finishing late, say). To "restart", open a new
    client, or wrap ``inner`` again. ``close()`` still closes ``inner``.

    Args:
        inner: the journal to wrap.
        step: where to crash; None never crashes (the wrapper only records).
        lose_entry: crash before the entry is written rather than after.

    Attributes:
        appended: every entry the core asked this wrapper to append, in order.
        lost: those of them that never reached ``inner``.
        crashed: the crash, once it happened.
    """

    def __init__(
        self, inner: JournalBackend, *, step: int | str | None = None, lose_entry: bool = False
    ) -> None:
        self.inner = inner
        self.appended: list[Entry] = []
        self.lost: list[Entry] = []
        self.crashed: SimulatedCrash | None = None
        self._step = _check_step(step)
        self._lose_entry = lose_entry
        self._lock = threading.Lock()

    def writes(self) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
        """The entries asked to append so far, and those of them lost (a consistent snapshot)."""
        with self._lock:
            return tuple(self.appended), tuple(self.lost)

    def _matches(self, entry: Entry) -> bool:
        step = self._step
        if step is None:
            return False
        return entry.name == step if isinstance(step, str) else entry.index == step

    def _alive(self) -> None:
        crash = self.crashed
        if crash is not None:
            raise SimulatedCrash(crash.entry, crash.durable)

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        self._alive()
        return self.inner.create_invocation(invocation)

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        self._alive()
        return self.inner.get_invocation(invocation_id)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        self._alive()
        return self.inner.update_invocation(invocation)

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        self._alive()
        return self.inner.read_entries(invocation_id, start)

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        with self._lock:
            self.appended.append(entry)
            if self.crashed is not None:  # dead: nothing more reaches the journal
                self.lost.append(entry)
                raise SimulatedCrash(self.crashed.entry, self.crashed.durable)
            crash_here = self._matches(entry)
            if crash_here:
                self._step = None  # one crash, even if two threads write that step
                if self._lose_entry:
                    self.lost.append(entry)
                    self.crashed = SimulatedCrash(entry, durable=False)
                    raise self.crashed
        self.inner.append_entry(invocation_id, entry)
        if crash_here:
            with self._lock:
                self.crashed = SimulatedCrash(entry, durable=True)
            raise self.crashed

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        self._alive()
        return self.inner.list_invocations(status)

    def delete_invocation(self, invocation_id: str) -> bool:
        self._alive()
        return self.inner.delete_invocation(invocation_id)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> CrashingBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.crashed is not None:
            state = f"crashed at index {self.crashed.entry.index}"
        else:
            state = f"step={self._step!r}" if self._step is not None else "recording"
        return f"CrashingBackend({self.inner!r}, {state})"


@attrs.frozen
class CrashReport:
    """What :func:`crash_and_rerun` saw.

    A step counts as *run* in an attempt when that attempt asked the journal
    to record its outcome (its closure ran to a result or a terminal
    failure), so a closure that was retried counts once. A ``run_async``
    closure still running when the crash happened is not waited for.

    Attributes:
        invocation_id: the invocation that was crashed and re-run.
        crash: the :class:`SimulatedCrash` that ended the first run.
        first_run: the entries the first run asked to write, in order,
            durable or not.
        lost: those of them that never reached the journal (the crashed step
            with ``lose_entry=True``; any step finishing after the crash).
        rerun: the entries the re-run wrote, in order.
        output: what the re-run returned.
    """

    invocation_id: str
    crash: SimulatedCrash
    first_run: tuple[Entry, ...]
    lost: tuple[Entry, ...]
    rerun: tuple[Entry, ...]
    output: Any

    @property
    def called_again(self) -> tuple[Entry, ...]:
        """The re-run's entries for steps whose closures the first run had already run.

        Only ``run`` steps count (a ``wait``/``wait_first`` decision has no
        closure). Empty when every step the first run ran was durable before
        the crash; with ``lose_entry=True``, at least the crashed step.
        """
        seen = {entry.index for entry in self.first_run}
        return tuple(
            entry for entry in self.rerun if entry.index in seen and entry.kind is EntryKind.RUN
        )

    @property
    def replayed(self) -> tuple[int, ...]:
        """Journal indexes the re-run took from the journal instead of running."""
        durable = {e.index for e in self.first_run} - {e.index for e in self.lost}
        return tuple(sorted(durable - {e.index for e in self.rerun}))

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

    The first run goes through a :class:`CrashingBackend` around
    ``runtime.backend``; the re-run through a fresh recording wrapper, as a
    restarted worker with a new client would (threads of the crashed run
    that are still going keep hitting the dead wrapper). ``runtime.backend``
    is restored afterwards. The re-run is ``runtime.invoke`` with the same
    input and invocation id.

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
        except SimulatedCrash:
            crash = crashing.crashed
            if crash is None:
                raise  # another CrashingBackend's crash: not ours to handle
        else:
            written = ", ".join(_describe(e) for e in crashing.appended) or "nothing"
            raise AssertionError(
                f"invocation {inv_id!r} finished without reaching step {step!r}, so no crash "
                f"was simulated; it journaled: {written}"
            )
        restarted = CrashingBackend(original)
        runtime.backend = restarted
        output = runtime.invoke(handler, input, invocation_id=inv_id)
    finally:
        runtime.backend = original
    first_run, lost = crashing.writes()
    return CrashReport(inv_id, crash, first_run, lost, restarted.writes()[0], output)


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
