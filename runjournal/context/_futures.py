"""Futures: side effects started by ``ctx.run_async`` and the journaled choices
``ctx.wait_first`` / ``ctx.wait`` make among them.

A future is *complete* once its entry is durable in the journal (or once it
failed in a way that cannot be journaled). Completions are numbered, under one
lock per invocation attempt, after the entry's ``append_entry`` has returned;
``wait_first`` and ``wait`` decide by those numbers, so a decision only ever
names futures whose entries are already durable, and it is journaled after
them. A replay reads the decision back instead of deciding again.

A :class:`RunFuture` is a handle: its state lives in the :class:`FutureGroup`
of the attempt that started it, which is the only code that changes it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Executor
from concurrent.futures import Future as ExecutorFuture
from typing import Any, Generic, TypeVar

import attrs

from runjournal.context._errors import ContextMisuseError
from runjournal.context._log import emit
from runjournal.journal import Entry, EntryKind, JournalCorrupt

__all__ = ["FutureGroup", "RunFuture", "decision_entry", "read_decision"]

T = TypeVar("T")

# The journaled value of a future, or its terminal error raised; given the
# entry and the original error to chain to (None on replay).
Outcome = Callable[[Entry, BaseException | None], Any]
# What a task run on the executor returns: the entry it made durable, and the
# original error of a terminal failure.
Task = Callable[[], tuple[Entry, BaseException | None]]

DECISION_CODEC = "json"


class State(enum.Enum):
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

    __slots__ = ("_group", "_index", "_name")

    def __init__(self, group: FutureGroup, index: int, name: str | None) -> None:
        self._group = group
        self._index = index
        self._name = name

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
        return self._group.state(self._index) is not State.RUNNING

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
        return self._group.result(self._index)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        label = repr(self._name) if self._name is not None else "<unnamed>"
        return f"<RunFuture {label} index={self._index} {self._group.state(self._index).value}>"


@attrs.define
class Slot:
    """What a group knows of one future."""

    future: RunFuture[Any]
    outcome: Outcome
    state: State = State.RUNNING
    seq: int = -1  # completion number, set when the state leaves RUNNING
    entry: Entry | None = None
    cause: BaseException | None = None
    error: BaseException | None = None
    retrieved: bool = False
    submitted: ExecutorFuture[None] | asyncio.Task[None] | None = None  # what runs it

    def journaled(self) -> Slot:
        """This slot, if it can be chosen; else its error, raised (and retrieved).

        A future that failed without a journal entry cannot be chosen: the
        choice would name an index that has nothing recorded.
        """
        if self.error is not None:
            self.retrieved = True
            raise self.error
        return self

    def unretrieved_failure(self) -> str | None:
        """How a failure nobody retrieved is described, or None."""
        if self.retrieved:
            return None
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        if self.entry is not None and self.entry.failure is not None:
            return f"journaled {self.entry.failure.type_name}: {self.entry.failure.message}"
        return None


class FutureGroup:
    """The futures of one invocation attempt, and the order they completed in.

    Args:
        invocation_id: the invocation the attempt runs.
        executor: runs the futures' tasks (None: ``start`` is refused).
        check_usable: raises if the caller may not use futures here (called
            by ``result()``, with the operation's label).
    """

    def __init__(
        self,
        invocation_id: str,
        executor: Executor | None,
        check_usable: Callable[[str], None],
        handler: str | None = None,
    ) -> None:
        self.invocation_id = invocation_id
        self.handler = handler
        self.executor = executor
        self.check_usable = check_usable
        self._cond = threading.Condition()
        self._completed = 0
        self._slots: dict[int, Slot] = {}

    # -- creating ----------------------------------------------------------------

    #: The class of the futures this group hands out.
    future_type: type[RunFuture[Any]] = RunFuture

    def resolved(
        self, index: int, name: str | None, entry: Entry, outcome: Outcome
    ) -> RunFuture[Any]:
        """A future whose entry is already journaled (replay): complete at once."""
        fut: RunFuture[Any] = self.future_type(self, index, name)
        with self._cond:
            slot = self._slots[index] = Slot(fut, outcome)
            self.settle_slot(slot, entry=entry)
        return fut

    def start(self, index: int, name: str | None, task: Task, outcome: Outcome) -> RunFuture[Any]:
        """Run ``task`` (execute ``fn`` with retries, journal the entry) on the executor."""
        assert self.executor is not None
        fut: RunFuture[Any] = RunFuture(self, index, name)
        with self._cond:
            slot = self._slots[index] = Slot(fut, outcome)

        def work() -> None:
            try:
                entry, cause = task()
            except BaseException as exc:
                # Kept for result()/wait; the worker thread must not die with it.
                self.fail(slot, exc)
            else:
                with self._cond:
                    self.settle_slot(slot, entry=entry, cause=cause)

        try:
            slot.submitted = self.executor.submit(work)
        except RuntimeError as exc:  # the executor is shut down
            error = RuntimeError(
                f"run_async {fut!r} of invocation {self.invocation_id!r} cannot start: the "
                f"Runtime's executor is shut down (Runtime.close() was called): {exc}"
            )
            self.fail(slot, error)
            raise error from exc
        return fut

    def fail(self, slot: Slot, error: BaseException) -> None:
        with self._cond:
            self.settle_slot(slot, error=error)

    def settle_slot(
        self,
        slot: Slot,
        *,
        entry: Entry | None = None,
        cause: BaseException | None = None,
        error: BaseException | None = None,
    ) -> None:
        # Called with the lock held, after the entry (if any) is durable: the
        # completion number is what wait_first/wait decide by.
        if slot.state is not State.RUNNING:
            return
        slot.entry, slot.cause, slot.error = entry, cause, error
        slot.state = State.JOURNALED if error is None else State.FAILED
        slot.seq = self._completed
        self._completed += 1
        self._cond.notify_all()

    # -- one future --------------------------------------------------------------

    def state(self, index: int) -> State:
        """Where the future at ``index`` stands."""
        return self._slots[index].state

    def result(self, index: int) -> Any:
        """The value of the future at ``index`` once complete, or its error raised."""
        slot = self._slots[index]
        self.check_usable("RunFuture.result()")
        with self._cond:
            self._cond.wait_for(lambda: slot.state is not State.RUNNING)
        slot.retrieved = True
        if slot.error is not None:
            raise slot.error
        assert slot.entry is not None
        return slot.outcome(slot.entry, slot.cause)

    # -- checking arguments ------------------------------------------------------

    def check_members(self, operation: str, futs: Sequence[object]) -> list[Slot]:
        """The slots of ``futs``; refuse an empty call, non-futures, foreign futures
        and duplicates."""
        if not futs:
            raise ValueError(
                f"ctx.{operation}() needs at least one future; pass the futures returned by "
                f"ctx.run_async(), e.g. ctx.{operation}(a, b)"
            )
        checked: list[Slot] = []
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
            slot = self._slots.get(fut.index)
            if slot is None or slot.future is not fut:
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
            checked.append(slot)
        return checked

    # -- waiting -------------------------------------------------------------------

    def first(self, slots: Sequence[Slot]) -> RunFuture[Any]:
        """The first of ``slots`` to complete; raise its error if it failed unjournaled."""
        with self._cond:
            self._cond.wait_for(lambda: any(s.state is not State.RUNNING for s in slots))
            slot = min((s for s in slots if s.state is not State.RUNNING), key=_seq)
        return slot.journaled().future

    def in_completion_order(self, slots: Sequence[Slot]) -> list[RunFuture[Any]]:
        """The futures of ``slots`` once all are journaled, in completion order.

        The first one to fail without a journal entry is raised at once.
        """

        def ready() -> bool:
            states = [s.state for s in slots]
            return State.FAILED in states or State.RUNNING not in states

        with self._cond:
            self._cond.wait_for(ready)
            ordered = sorted(slots, key=_seq)
        return [slot.journaled().future for slot in ordered]

    def chosen(self, slots: Sequence[Slot], indexes: Iterable[int]) -> list[RunFuture[Any]]:
        """The futures a journaled decision chose, once each is complete.

        Chosen futures were journaled before the decision, so they are resolved
        from the journal already; wait anyway, in case this attempt read the
        decision but not yet an entry written just before it.
        """
        by_index = {slot.future.index: slot for slot in slots}
        return [self.first([by_index[i]]) for i in indexes]

    # -- the end of an attempt -----------------------------------------------------

    def settle(self, *, strict: bool) -> None:
        """Wait until every future is journaled or has failed; report unretrieved failures.

        With ``strict``, raise the first (by index) unretrieved failure that
        left no journal entry: the invocation must not complete without it.
        Other unretrieved failures are logged at WARNING.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: all(s.state is not State.RUNNING for s in self._slots.values())
            )
        self.report_unretrieved(strict=strict)

    def slots(self) -> list[Slot]:
        """Every future's slot, by index."""
        with self._cond:
            return sorted(self._slots.values(), key=lambda s: s.future.index)

    def report_unretrieved(self, *, strict: bool) -> None:
        """Once every future has ended: raise (``strict``) or log what nobody retrieved."""
        for slot in self.slots():
            message = slot.unretrieved_failure()
            if message is None:
                continue
            if strict and slot.error is not None:
                slot.journaled()  # raises it, marked retrieved
            emit(
                logging.WARNING,
                "invocation %r: %r failed and its result was never retrieved: %s",
                self.invocation_id,
                slot.future,
                message,
                invocation_id=self.invocation_id,
                handler=self.handler,
                step=slot.future.name,
                index=slot.future.index,
            )

    def abandon(self) -> None:
        """Cancel futures that have not started; do not wait for running ones."""
        with self._cond:
            slots = list(self._slots.values())
        for slot in slots:
            if slot.submitted is not None and slot.submitted.cancel():
                self.fail(
                    slot,
                    CancelledError(f"{slot.future!r} was cancelled: the handler was interrupted"),
                )


def _seq(slot: Slot) -> int:
    return slot.seq


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
