"""Futures: side effects started by ``ctx.run_async`` and the journaled choices
``ctx.wait_first`` / ``ctx.wait`` make among them.

A future is *complete* once its entry is durable in the journal (or once it
failed in a way that cannot be journaled). Completions are numbered, under one
lock per invocation attempt, after the entry's ``append_entry`` has returned;
``wait_first`` and ``wait`` decide by those numbers, so a decision only ever
names futures whose entries are already durable, and it is journaled after
them. A replay reads the decision back instead of deciding again.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Executor
from concurrent.futures import Future as _ExecutorFuture
from typing import Any, Generic, TypeVar

from runjournal.context._errors import ContextMisuseError
from runjournal.journal import Entry, EntryKind, JournalCorrupt

__all__ = [
    "FutureGroup",
    "RunFuture",
    "decision_entry",
    "is_journaled_failure",
    "read_decision",
    "unretrieved_message",
]

T = TypeVar("T")

# The journaled value of a future, or its terminal error raised; given the
# entry and the original error to chain to (None on replay).
Outcome = Callable[[Entry, BaseException | None], Any]
# What a task run on the executor returns: the entry it made durable, and the
# original error of a terminal failure.
Task = Callable[[], tuple[Entry, BaseException | None]]

DECISION_CODEC = "json"


class _State(enum.Enum):
    RUNNING = "running"
    JOURNALED = "journaled"
    FAILED = "failed"  # ended without a journal entry: the attempt must stop


class RunFuture(Generic[T]):
    """A side effect started by :meth:`Context.run_async`.

    Its journal index was taken when ``run_async`` was called. Use
    :meth:`result` to get its value, or pass it to ``ctx.wait_first`` /
    ``ctx.wait`` to choose among several futures the same way on every replay.
    A future belongs to the invocation attempt that started it.
    """

    def __init__(self, group: FutureGroup, index: int, name: str | None, outcome: Outcome) -> None:
        self._group = group
        self._index = index
        self._name = name
        self._outcome = outcome
        self._state = _State.RUNNING
        self._seq = -1  # completion number, set when the state leaves RUNNING
        self._entry: Entry | None = None
        self._cause: BaseException | None = None
        self._error: BaseException | None = None
        self._retrieved = False
        self._submitted: _ExecutorFuture[None] | None = None

    @property
    def index(self) -> int:
        """The journal index this future's outcome is recorded at."""
        return self._index

    @property
    def name(self) -> str | None:
        """The name given to ``run_async``."""
        return self._name

    @property
    def invocation_id(self) -> str:
        """The invocation that started this future."""
        return self._group.invocation_id

    def done(self) -> bool:
        """Whether the outcome is journaled (or the future failed without one).

        On replay a journaled future is done at once, so do not branch on this
        in handler logic: use ``ctx.wait_first`` to choose deterministically.
        """
        return self._state is not _State.RUNNING

    def result(self) -> T:
        """Block until the outcome is journaled; return the value decoded from it.

        Raises:
            TerminalError: the journaled failure (``fn`` raised one, or its
                retries ran out), now and on every replay.
            CodecError: the result cannot be encoded, or the journal's bytes
                decoded (not retried; nothing was journaled on encode).
            ContextMisuseError: ``fn`` called a ctx operation, or ``result()``
                was called inside a run closure.
            EntryConflict: another worker recorded this step first.
        """
        self._group.check_usable()
        self._group.wait_for(self)
        self._retrieved = True
        if self._error is not None:
            raise self._error
        assert self._entry is not None
        return self._outcome(self._entry, self._cause)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        label = repr(self._name) if self._name is not None else "<unnamed>"
        return f"<RunFuture {label} index={self._index} {self._state.value}>"


class FutureGroup:
    """The futures of one invocation attempt, and the order they completed in."""

    def __init__(
        self,
        invocation_id: str,
        executor: Executor | None,
        check_usable: Callable[[], None],
    ) -> None:
        self.invocation_id = invocation_id
        self.executor = executor
        self.check_usable = check_usable
        self._cond = threading.Condition()
        self._completed = 0
        self._futures: list[RunFuture[Any]] = []

    # -- creating ----------------------------------------------------------------

    def resolved(
        self, index: int, name: str | None, entry: Entry, outcome: Outcome
    ) -> RunFuture[Any]:
        """A future whose entry is already journaled (replay): complete at once."""
        fut: RunFuture[Any] = RunFuture(self, index, name, outcome)
        with self._cond:
            self._futures.append(fut)
            self._settle(fut, entry=entry)
        return fut

    def start(self, index: int, name: str | None, task: Task, outcome: Outcome) -> RunFuture[Any]:
        """Run ``task`` (execute ``fn`` with retries, journal the entry) on the executor."""
        assert self.executor is not None
        fut: RunFuture[Any] = RunFuture(self, index, name, outcome)
        with self._cond:
            self._futures.append(fut)

        def work() -> None:
            try:
                entry, cause = task()
            except BaseException as exc:
                # Kept for result()/wait; the worker thread must not die with it.
                self.fail(fut, exc)
            else:
                with self._cond:
                    self._settle(fut, entry=entry, cause=cause)

        try:
            fut._submitted = self.executor.submit(work)
        except RuntimeError as exc:  # the executor is shut down
            error = RuntimeError(
                f"run_async {fut!r} of invocation {self.invocation_id!r} cannot start: the "
                f"Runtime's executor is shut down (Runtime.close() was called): {exc}"
            )
            self.fail(fut, error)
            raise error from exc
        return fut

    def fail(self, fut: RunFuture[Any], error: BaseException) -> None:
        """End ``fut`` without a journal entry."""
        with self._cond:
            self._settle(fut, error=error)

    def _settle(
        self,
        fut: RunFuture[Any],
        *,
        entry: Entry | None = None,
        cause: BaseException | None = None,
        error: BaseException | None = None,
    ) -> None:
        # Called with the lock held, after the entry (if any) is durable: the
        # completion number is what wait_first/wait decide by.
        if fut._state is not _State.RUNNING:
            return
        fut._entry, fut._cause, fut._error = entry, cause, error
        fut._state = _State.JOURNALED if error is None else _State.FAILED
        fut._seq = self._completed
        self._completed += 1
        self._cond.notify_all()

    # -- checking arguments ------------------------------------------------------

    def check_members(self, operation: str, futs: Sequence[object]) -> list[RunFuture[Any]]:
        """Refuse an empty call, non-futures, foreign futures and duplicates."""
        if not futs:
            raise ValueError(
                f"ctx.{operation}() needs at least one future; pass the futures returned by "
                f"ctx.run_async(), e.g. ctx.{operation}(a, b)"
            )
        checked: list[RunFuture[Any]] = []
        seen: set[int] = set()
        for fut in futs:
            if not isinstance(fut, RunFuture):
                hint = (
                    f"; to pass a collection, unpack it: ctx.{operation}(*futures)"
                    if isinstance(fut, Iterable)
                    else ""
                )
                raise TypeError(
                    f"ctx.{operation}() takes RunFuture objects returned by ctx.run_async(), "
                    f"got {type(fut).__name__}{hint}"
                )
            if fut._group is not self:
                where = (
                    "an earlier attempt of this invocation; a future lives only as long as the "
                    "attempt that started it: call ctx.run_async() again in this attempt (a "
                    "journaled outcome replays without running fn)"
                    if fut.invocation_id == self.invocation_id
                    else f"invocation {fut.invocation_id!r}; a future can only be waited on "
                    "by the invocation that started it"
                )
                raise ContextMisuseError(
                    f"ctx.{operation}() in invocation {self.invocation_id!r} was passed "
                    f"{fut!r}, which belongs to {where}"
                )
            if fut.index in seen:
                raise ValueError(
                    f"ctx.{operation}() was passed {fut!r} twice; pass each future once "
                    "(a future may take part in several wait calls, but once in each)"
                )
            seen.add(fut.index)
            checked.append(fut)
        return checked

    # -- waiting -------------------------------------------------------------------

    def wait_for(self, fut: RunFuture[Any]) -> None:
        """Block until ``fut`` is no longer running."""
        with self._cond:
            self._cond.wait_for(lambda: fut._state is not _State.RUNNING)

    def first(self, futs: Sequence[RunFuture[Any]]) -> RunFuture[Any]:
        """The first of ``futs`` to complete; raise its error if it failed unjournaled."""
        with self._cond:
            self._cond.wait_for(lambda: any(f._state is not _State.RUNNING for f in futs))
            fut = min((f for f in futs if f._state is not _State.RUNNING), key=_seq)
        return _journaled(fut)

    def in_completion_order(self, futs: Sequence[RunFuture[Any]]) -> list[RunFuture[Any]]:
        """``futs`` once all are journaled, in completion order.

        The first one to fail without a journal entry is raised at once.
        """

        def ready() -> bool:
            states = [f._state for f in futs]
            return _State.FAILED in states or _State.RUNNING not in states

        with self._cond:
            self._cond.wait_for(ready)
            ordered = sorted(futs, key=_seq)
        for fut in ordered:
            _journaled(fut)
        return ordered

    # -- the end of an attempt -----------------------------------------------------

    def drain(self) -> list[RunFuture[Any]]:
        """Wait for every started future; return those whose failure nobody retrieved."""
        with self._cond:
            self._cond.wait_for(lambda: all(f._state is not _State.RUNNING for f in self._futures))
            futs = list(self._futures)
        unretrieved = []
        for fut in futs:
            if fut._retrieved:
                continue
            if fut._error is not None or (fut._entry is not None and fut._entry.failure):
                unretrieved.append(fut)
        return unretrieved

    def abandon(self) -> None:
        """Cancel futures that have not started; do not wait for running ones."""
        with self._cond:
            futs = list(self._futures)
        for fut in futs:
            submitted = fut._submitted
            if submitted is not None and submitted.cancel():
                self.fail(
                    fut, CancelledError(f"{fut!r} was cancelled: the handler was interrupted")
                )


def _seq(fut: RunFuture[Any]) -> int:
    return fut._seq


def _journaled(fut: RunFuture[Any]) -> RunFuture[Any]:
    # A future that failed without a journal entry cannot be chosen: the
    # choice would name an index that has nothing recorded. Its error stops
    # the attempt instead.
    if fut._error is not None:
        fut._retrieved = True
        raise fut._error
    return fut


# -- journaled decisions -----------------------------------------------------------


def decision_entry(index: int, kind: EntryKind, members: list[int], chosen: list[int]) -> Entry:
    """The entry recording a wait_first winner or a wait order.

    The payload is JSON: ``{"of": [sorted member indexes], "winner": i}`` for
    WAIT_FIRST, ``{"of": [...], "order": [indexes in completion order]}`` for WAIT.
    """
    body: dict[str, Any] = {"of": sorted(members)}
    if kind is EntryKind.WAIT_FIRST:
        body["winner"] = chosen[0]
    else:
        body["order"] = chosen
    return Entry(
        index=index,
        kind=kind,
        name=None,
        payload=json.dumps(body, separators=(",", ":")).encode(),
        codec=DECISION_CODEC,
        created_at=time.time(),
    )


def read_decision(entry: Entry) -> tuple[list[int], list[int]]:
    """The member indexes and the chosen ones (winner, or order) of a decision entry.

    Raises:
        JournalCorrupt: the entry does not hold a well-formed decision.
    """
    where = f"{entry.kind.value} entry at index {entry.index}"
    try:
        if entry.codec != DECISION_CODEC or entry.payload is None:
            raise ValueError(f"codec {entry.codec!r}, payload {entry.payload!r}")
        body = json.loads(entry.payload)
        members = body["of"]
        chosen = [body["winner"]] if entry.kind is EntryKind.WAIT_FIRST else body["order"]
        if not (_ints(members) and _ints(chosen)):
            raise ValueError("indexes are not whole numbers")
        if entry.kind is EntryKind.WAIT and sorted(chosen) != sorted(members):
            raise ValueError("the order is not a permutation of the members")
        if not set(chosen) <= set(members):
            raise ValueError("the winner is not a member")
    except (ValueError, TypeError, KeyError) as exc:
        raise JournalCorrupt(f"{where}: not a valid decision: {exc}") from exc
    return members, chosen


def _ints(values: object) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )


def unretrieved_message(fut: RunFuture[Any]) -> str:
    """How an unretrieved failure of ``fut`` is logged."""
    if fut._error is not None:
        return f"{type(fut._error).__name__}: {fut._error}"
    assert fut._entry is not None and fut._entry.failure is not None
    failure = fut._entry.failure
    return f"journaled {failure.type_name}: {failure.message}"


def is_journaled_failure(fut: RunFuture[Any]) -> bool:
    """Whether ``fut`` ended with a journaled terminal failure."""
    return fut._error is None and fut._entry is not None and fut._entry.failure is not None
