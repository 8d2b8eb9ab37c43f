"""One attempt at running an invocation: the object the Runtime drives.

An :class:`Attempt` owns everything that lives exactly as long as one run of
a handler: the replay cursor, the futures started, which thread runs the
handler, whether a closure is running, and whether the attempt has ended.
The :class:`~runjournal.context.Context` a handler gets is a thin front door
onto it; the Runtime starts, settles and ends it through public methods.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

from runjournal.context._cursor import ReplayCursor, describe
from runjournal.context._errors import (
    ContextMisuseError,
    NonDeterminismError,
    failure_of,
    terminal_from,
)
from runjournal.context._futures import (
    FutureGroup,
    RunFuture,
    Slot,
    decision_entry,
    read_decision,
)
from runjournal.context._options import RunOptions, resolve_options
from runjournal.context._retry import Clock, Failed, RetryHook, Succeeded, call_with_retry
from runjournal.journal import (
    Codec,
    CodecError,
    Entry,
    EntryKind,
    JournalBackend,
    decode_value,
    encode_value,
)

__all__ = ["Attempt"]


class Attempt:
    """One run of a handler for one invocation. Thread-safe where it must be.

    The thread that builds the attempt is the one that runs the handler: ctx
    operations are accepted from it alone, and not while one of this
    attempt's closures runs in it. Closures of ``run_async`` run on other
    threads, so they, and any thread a closure starts, are refused too.

    Args:
        backend: the journal.
        invocation_id: the invocation being run.
        recorded: the entries already journaled (replayed by index).
        handler: the handler's registered name.
        defaults: the run options a step starts from.
        clock: where retries read time and sleep.
        on_retry: called after each failed attempt of a step.
        executor: runs ``run_async`` closures (None: ``run_async`` is refused).
    """

    def __init__(
        self,
        backend: JournalBackend,
        invocation_id: str,
        recorded: Iterable[Entry],
        *,
        handler: str,
        defaults: RunOptions,
        clock: Clock,
        on_retry: RetryHook | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.invocation_id = invocation_id
        self.handler = handler
        self._backend = backend
        self._cursor = ReplayCursor(backend, invocation_id, recorded)
        self._defaults = defaults
        self._clock = clock
        self._on_retry = on_retry
        self._max_payload = backend.capabilities.max_payload_bytes
        self._futures = FutureGroup(invocation_id, executor, self.check_usable)
        self._owner = threading.get_ident()
        self._closures_lock = threading.Lock()
        self._closures = 0  # closures of this attempt running now, in any thread
        self._in_closure = False  # one of them runs in the handler's thread
        self._ended = False

    # -- who may act -------------------------------------------------------------

    def check_usable(self, label: str) -> None:
        """Raise :class:`ContextMisuseError` unless the handler itself may do ``label`` now."""
        if self._ended:
            raise ContextMisuseError(
                f"{label} was called on the Context of invocation {self.invocation_id!r} after "
                "its attempt ended; a Context is valid only while its handler runs, so keep no "
                "reference to ctx (or its futures) beyond the handler"
            )
        if threading.get_ident() != self._owner:
            if self._closures:
                raise ContextMisuseError(
                    f"{label} was called inside a run closure of invocation "
                    f"{self.invocation_id!r} (or a thread one started); closures must not call "
                    "ctx operations. Return a value from the closure and call ctx after it"
                )
            raise ContextMisuseError(
                f"{label} was called from a thread that is not running the handler of "
                f"invocation {self.invocation_id!r}; ctx operations belong to the handler's "
                "own thread"
            )
        if self._in_closure:
            raise ContextMisuseError(
                f"{label} was called inside a run closure of invocation {self.invocation_id!r}; "
                "closures must not call ctx operations. Return a value from the closure and "
                "call ctx after it"
            )

    def is_replaying(self) -> bool:
        """Whether steps not yet reached are already journaled."""
        return self._cursor.is_replaying()

    # -- steps ---------------------------------------------------------------------

    def run(
        self,
        fn: Callable[[], Any],
        name: str | None,
        options: RunOptions | None,
        overrides: dict[str, Any],
    ) -> Any:
        """``ctx.run``: the journaled outcome of ``fn`` (calling it if not yet journaled)."""
        self.check_usable("ctx.run()")
        opts = resolve_options(self._defaults, options, overrides)
        index, recorded = self._cursor.reserve(EntryKind.RUN, name)
        cause = None
        if recorded is None:
            recorded, cause = self._execute(fn, index, name, opts)
            self._cursor.record(recorded)
        return self._outcome(recorded, opts.codec, cause)

    def run_async(
        self,
        fn: Callable[[], Any],
        name: str | None,
        options: RunOptions | None,
        overrides: dict[str, Any],
    ) -> RunFuture[Any]:
        """``ctx.run_async``: a future of ``fn``'s journaled outcome."""
        self.check_usable("ctx.run_async()")
        if not callable(fn):
            raise TypeError(
                f"run_async {name!r}: fn must be a callable taking no arguments, got {fn!r}"
            )
        if self._futures.executor is None:
            raise ContextMisuseError(
                "ctx.run_async() needs an executor; this Context was built without one. "
                "Run handlers through a Runtime, which owns the executor"
            )
        opts = resolve_options(self._defaults, options, overrides)
        index, recorded = self._cursor.reserve(EntryKind.RUN, name)
        codec = opts.codec

        def outcome(entry: Entry, cause: BaseException | None) -> Any:
            return self._outcome(entry, codec, cause)

        if recorded is not None:
            return self._futures.resolved(index, name, recorded, outcome)

        def task() -> tuple[Entry, BaseException | None]:
            entry, cause = self._execute(fn, index, name, opts)
            # The future completes only once this returns: its entry is durable.
            self._cursor.record(entry)
            return entry, cause

        return self._futures.start(index, name, task, outcome)

    def wait_first(self, futs: tuple[RunFuture[Any], ...]) -> RunFuture[Any]:
        """``ctx.wait_first``: the first future to complete, journaled."""
        self.check_usable("ctx.wait_first()")
        members = self._futures.check_members("wait_first", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT_FIRST, None)
        if recorded is not None:
            [winner] = self._replayed(recorded, members)
            return winner
        winner = self._futures.first(members)
        self._cursor.record(
            decision_entry(index, EntryKind.WAIT_FIRST, _indexes(members), [winner.index])
        )
        return winner

    def wait(self, futs: tuple[RunFuture[Any], ...]) -> Iterator[RunFuture[Any]]:
        """``ctx.wait``: the futures in completion order, journaled before any is handed out."""
        self.check_usable("ctx.wait()")
        members = self._futures.check_members("wait", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT, None)
        if recorded is not None:
            return iter(self._replayed(recorded, members))
        ordered = self._futures.in_completion_order(members)
        self._cursor.record(
            decision_entry(index, EntryKind.WAIT, _indexes(members), [fut.index for fut in ordered])
        )
        return iter(ordered)

    def _replayed(self, recorded: Entry, members: list[Slot]) -> list[RunFuture[Any]]:
        """The futures a journaled decision chose."""
        journaled_members, chosen = read_decision(recorded)
        asked = _indexes(members)
        if sorted(journaled_members) != sorted(asked):
            kind = recorded.kind.value
            raise NonDeterminismError(
                self.invocation_id,
                recorded.index,
                recorded=f"{describe(recorded.kind, None)} among indexes {journaled_members}",
                asked=f"{kind} among indexes {sorted(asked)}",
            )
        return self._futures.chosen(members, chosen)

    # -- the end -----------------------------------------------------------------

    def settle(self, *, strict: bool) -> None:
        """Wait until every future of this attempt is journaled or has failed.

        With ``strict``, raise the first unretrieved failure that left no
        journal entry: the invocation must not complete without it.
        """
        self._futures.settle(strict=strict)

    def abandon(self) -> None:
        """Cancel the futures that have not started (the handler was interrupted)."""
        self._futures.abandon()

    def end(self) -> None:
        """End the attempt: from now on every ctx operation is refused."""
        self._ended = True

    # -- running one step ----------------------------------------------------------

    def _execute(
        self, fn: Callable[[], Any], index: int, name: str | None, opts: RunOptions
    ) -> tuple[Entry, BaseException | None]:
        """Call ``fn`` with retries; return the entry to journal (not yet written)
        and, for a failure, the original error to chain to what is raised."""
        if not callable(fn):
            raise TypeError(f"run {name!r}: fn must be a callable taking no arguments, got {fn!r}")
        in_owner = threading.get_ident() == self._owner

        def attempt() -> Any:
            # The attempt knows a closure runs, whatever threads it starts.
            with self._closures_lock:
                self._closures += 1
                if in_owner:
                    self._in_closure = True
            try:
                return fn()
            finally:
                with self._closures_lock:
                    self._closures -= 1
                    if in_owner:
                        self._in_closure = False

        outcome = call_with_retry(
            attempt, opts, name=name, clock=self._clock, on_retry=self._on_retry
        )
        codec = opts.codec
        if isinstance(outcome, Failed):
            entry = Entry(
                index=index,
                kind=EntryKind.RUN,
                name=name,
                payload=None,
                codec=codec.name,
                failure=failure_of(outcome.error),
                created_at=time.time(),
                attempts=outcome.attempts,
            )
            return entry, outcome.error
        assert isinstance(outcome, Succeeded)
        entry = Entry(
            index=index,
            kind=EntryKind.RUN,
            name=name,
            payload=self._encode(outcome.value, codec, index, name),
            codec=codec.name,
            created_at=time.time(),
            attempts=outcome.attempts,
        )
        return entry, None

    def _encode(self, value: Any, codec: Codec, index: int, name: str | None) -> bytes:
        where = self._where(index, name)
        payload = encode_value(codec, value, f"{where}: result")
        if self._max_payload is not None and len(payload) > self._max_payload:
            raise CodecError(
                f"{where}: the result encodes to {len(payload)} bytes, more "
                f"than this engine's limit of {self._max_payload}; return a reference to the "
                "data (a key, a URL) instead of the data"
            )
        return payload

    def _outcome(self, entry: Entry, codec: Codec, cause: BaseException | None = None) -> Any:
        """The value a journaled entry stands for, or its terminal error raised.

        A failure is raised as rebuilt from the journal even the first time
        (chained to the original), so a first run sees what a replay sees.
        """
        if entry.failure is not None:
            raise terminal_from(entry.failure) from cause
        where = self._where(entry.index, entry.name)
        if entry.codec != codec.name:
            raise CodecError(
                f"{where}: journaled with codec {entry.codec!r}, but the code now asks for "
                f"{codec.name!r}; keep the codec a step was recorded with"
            )
        if entry.payload is None:
            raise CodecError(f"{where}: the journaled entry has no payload")
        return decode_value(codec, entry.payload, where)

    def _where(self, index: int, name: str | None) -> str:
        label = repr(name) if name is not None else "<unnamed>"
        return f"run {label} (invocation {self.invocation_id!r}, index {index})"


def _indexes(slots: list[Slot]) -> list[int]:
    return [slot.future.index for slot in slots]
