"""The handler's view of a durable invocation: ``ctx.run`` and friends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

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
    decision_entry,
    is_journaled_failure,
    read_decision,
    unretrieved_message,
)
from runjournal.context._options import RunOptions, resolve_options
from runjournal.context._retry import Clock, Failed, RetryHook, Succeeded, call_with_retry
from runjournal.journal import CodecError, Entry, EntryKind

if TYPE_CHECKING:
    from runjournal.journal import Codec

__all__ = ["Context"]

T = TypeVar("T")

log = logging.getLogger("runjournal")

_local = threading.local()


def _active() -> list[Context]:
    stack: list[Context] | None = getattr(_local, "closures", None)
    if stack is None:
        stack = _local.closures = []
    return stack


class Context:
    """Durable operations for one invocation attempt. Handed to handlers; not built by users.

    ``executor`` runs the closures of :meth:`run_async`; without one,
    ``run_async`` is refused.
    """

    def __init__(
        self,
        cursor: ReplayCursor,
        *,
        handler: str,
        defaults: RunOptions,
        clock: Clock,
        on_retry: RetryHook | None = None,
        executor: Executor | None = None,
    ) -> None:
        self._cursor = cursor
        self._handler = handler
        self._defaults = defaults
        self._clock = clock
        self._on_retry = on_retry
        limit = cursor.backend.capabilities.max_payload_bytes
        self._max_payload = limit
        self._futures = FutureGroup(
            cursor.invocation_id,
            executor,
            lambda: self._check_usable("result", label="RunFuture.result()"),
        )

    @property
    def invocation_id(self) -> str:
        """The id this invocation is journaled under."""
        return self._cursor.invocation_id

    @property
    def handler_name(self) -> str:
        """The registered name of the running handler."""
        return self._handler

    def is_replaying(self) -> bool:
        """Whether later steps are already journaled (for logging, not for logic)."""
        return self._cursor.is_replaying()

    def run(
        self,
        fn: Callable[[], T],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> T:
        """Run ``fn`` once successfully; journal and return its result.

        On replay the journaled result is returned and ``fn`` is not called.
        The value returned is decoded from the journaled bytes, the first time
        as on replay.

        Args:
            fn: a callable taking no arguments.
            name: the step's name, checked on replay and shown in logs.
            options: a :class:`RunOptions` to start from.
            **option_kwargs: any :class:`RunOptions` field, overriding ``options``.

        Raises:
            TerminalError: ``fn`` raised one, or its retries ran out (journaled).
            NonDeterminismError: the journal has another step at this index.
            CodecError: the result cannot be encoded or the journal's bytes decoded.
            EntryConflict: another worker recorded this step first.
        """
        self._check_usable("run")
        opts = resolve_options(self._defaults, options, option_kwargs)
        index, recorded = self._cursor.reserve(EntryKind.RUN, name)
        cause = None
        if recorded is None:
            recorded, cause = self._execute(fn, index, name, opts)
            self._cursor.record(recorded)
        return self._outcome(recorded, opts.codec, cause)  # type: ignore[no-any-return]

    def run_void(
        self,
        fn: Callable[[], object],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> None:
        """Like :meth:`run` for a side effect whose return value is not kept."""
        self._check_usable("run_void")

        def call() -> None:
            fn()

        self.run(call, name=name, options=options, **option_kwargs)

    # -- futures ---------------------------------------------------------------

    def run_async(
        self,
        fn: Callable[[], T],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> RunFuture[T]:
        """Start ``fn`` on the Runtime's executor; return a future of its result.

        The journal index is taken now, when ``run_async`` is called. ``fn``
        gets the same options, retry policy (its own budget) and journaling as
        :meth:`run`; its entry may be written before those of futures started
        earlier, each at its own index, create-only. On replay a journaled
        outcome resolves the future at once and ``fn`` is not called.

        A handler may return while futures run: the invocation does not
        complete until every future it started is journaled. If one of them
        could not be journaled (a codec error, misuse, a conflict) and nobody
        retrieved that error, ``invoke`` raises it and the invocation stays
        pending. A journaled terminal failure nobody retrieved is logged at
        WARNING and does not change the invocation's outcome.

        Args:
            fn: a callable taking no arguments; it must not call ctx operations.
            name: the step's name, checked on replay and shown in logs.
            options: a :class:`RunOptions` to start from.
            **option_kwargs: any :class:`RunOptions` field, overriding ``options``.

        Returns:
            A :class:`RunFuture`; its errors surface from ``result()`` and from
            ``wait``/``wait_first`` (see :meth:`RunFuture.result`).

        Raises:
            NonDeterminismError: the journal has another step at this index.
            ContextMisuseError: called inside a run closure, or on a Context
                that has no executor.
        """
        self._check_usable("run_async")
        if not callable(fn):
            raise TypeError(
                f"run_async {name!r}: fn must be a callable taking no arguments, got {fn!r}"
            )
        if self._futures.executor is None:
            raise ContextMisuseError(
                "ctx.run_async() needs an executor; this Context was built without one. "
                "Run handlers through a Runtime, which owns the executor"
            )
        opts = resolve_options(self._defaults, options, option_kwargs)
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

    def wait_first(self, *futs: RunFuture[Any]) -> RunFuture[Any]:
        """Return the first of ``futs`` to complete, the same one on every replay.

        A future completes when its entry is durable. Takes the next journal
        index now; the winner's index is journaled there as a WAIT_FIRST entry
        (after the winner's own entry), and a replay returns that future even
        if other outcomes are journaled too or timings differ. To act on
        futures one by one as they complete, call ``wait_first`` in a loop on
        those not yet handled.

        Raises:
            ValueError: no futures, or one future passed twice.
            TypeError: an argument is not a :class:`RunFuture`.
            ContextMisuseError: a future of another invocation (or attempt),
                or called inside a run closure.
            NonDeterminismError: the journal recorded another step here, or a
                choice among other futures.
            CodecError, ContextMisuseError, EntryConflict: the first future to
                finish failed without a journal entry (its own error).
        """
        self._check_usable("wait_first")
        members = self._futures.check_members("wait_first", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT_FIRST, None)
        if recorded is not None:
            [winner] = self._replayed(recorded, members)
            return winner
        winner = self._futures.first(members)
        entry = decision_entry(index, EntryKind.WAIT_FIRST, _indexes(members), [winner.index])
        self._cursor.record(entry)
        return winner

    def wait(self, *futs: RunFuture[Any]) -> Iterator[RunFuture[Any]]:
        """Return an iterator over ``futs`` in completion order, the same on every replay.

        Takes the next journal index now, blocks until every future is
        journaled, journals their order there as a WAIT entry, then returns.
        The order is fixed before any future is handed out, so code in the
        loop body cannot act on an order a crash could change. A future that
        fails without a journal entry raises its error at once.

        Raises:
            The same errors as :meth:`wait_first`.
        """
        self._check_usable("wait")
        members = self._futures.check_members("wait", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT, None)
        if recorded is not None:
            return iter(self._replayed(recorded, members))
        ordered = self._futures.in_completion_order(members)
        entry = decision_entry(index, EntryKind.WAIT, _indexes(members), _indexes(ordered))
        self._cursor.record(entry)
        return iter(ordered)

    def _replayed(self, recorded: Entry, members: list[RunFuture[Any]]) -> list[RunFuture[Any]]:
        """The futures a journaled decision chose, once they are resolved."""
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
        by_index = {fut.index: fut for fut in members}
        result = [by_index[i] for i in chosen]
        for fut in result:
            # Chosen futures were journaled before the decision, so they are
            # resolved from the journal already; wait anyway, in case this
            # attempt read the decision but not yet an entry written just before it.
            self._futures.first([fut])
        return result

    def _settle_futures(self, *, strict: bool) -> None:
        """Wait until every future of this attempt is journaled or has failed.

        With ``strict``, raise the first (by index) unretrieved failure that
        left no journal entry: the invocation must not complete without it.
        Other unretrieved failures are logged at WARNING.
        """
        unretrieved = sorted(self._futures.drain(), key=lambda f: f.index)
        for fut in unretrieved:
            if strict and not is_journaled_failure(fut):
                fut._retrieved = True
                raise fut._error or RuntimeError(repr(fut))
            log.warning(
                "invocation %r: %r failed and its result was never retrieved: %s",
                self.invocation_id,
                fut,
                unretrieved_message(fut),
            )

    def _abandon_futures(self) -> None:
        """Cancel the futures that have not started (the handler was interrupted)."""
        self._futures.abandon()

    # -- pieces shared with futures ------------------------------------------

    def _check_usable(self, operation: str, *, label: str | None = None) -> None:
        if self in _active():
            raise ContextMisuseError(
                f"{label or f'ctx.{operation}()'} was called inside a run closure of invocation "
                f"{self.invocation_id!r}; closures must not call ctx operations. "
                "Return a value from the closure and call ctx after it"
            )

    def _execute(
        self, fn: Callable[[], Any], index: int, name: str | None, opts: RunOptions
    ) -> tuple[Entry, BaseException | None]:
        """Call ``fn`` with retries; return the entry to journal (not yet written)
        and, for a failure, the original error to chain to what is raised."""
        if not callable(fn):
            raise TypeError(f"run {name!r}: fn must be a callable taking no arguments, got {fn!r}")

        def attempt() -> Any:
            # Marks this thread as running one of this context's closures.
            stack = _active()
            stack.append(self)
            try:
                return fn()
            finally:
                stack.pop()

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
        payload = self._encode(outcome.value, codec, index, name)
        entry = Entry(
            index=index,
            kind=EntryKind.RUN,
            name=name,
            payload=payload,
            codec=codec.name,
            created_at=time.time(),
            attempts=outcome.attempts,
        )
        return entry, None

    def _encode(self, value: Any, codec: Codec, index: int, name: str | None) -> bytes:
        try:
            payload = codec.encode(value)
        except CodecError as exc:
            raise CodecError(f"{self._where(index, name)}: result not journaled: {exc}") from exc
        except Exception as exc:  # a user codec may raise anything
            raise CodecError(
                f"{self._where(index, name)}: codec {codec.name!r} failed to encode a "
                f"{type(value).__name__}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(payload, bytes):
            raise CodecError(
                f"{self._where(index, name)}: codec {codec.name!r} returned "
                f"{type(payload).__name__}, not bytes"
            )
        if self._max_payload is not None and len(payload) > self._max_payload:
            raise CodecError(
                f"{self._where(index, name)}: the result encodes to {len(payload)} bytes, more "
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
        if entry.codec != codec.name:
            raise CodecError(
                f"{self._where(entry.index, entry.name)}: journaled with codec {entry.codec!r}, "
                f"but the code now asks for {codec.name!r}; keep the codec a step was recorded with"
            )
        if entry.payload is None:
            raise CodecError(
                f"{self._where(entry.index, entry.name)}: the journaled entry has no payload"
            )
        try:
            return codec.decode(entry.payload)
        except CodecError as exc:
            raise CodecError(f"{self._where(entry.index, entry.name)}: {exc}") from exc
        except Exception as exc:
            raise CodecError(
                f"{self._where(entry.index, entry.name)}: codec {codec.name!r} failed to decode "
                f"{len(entry.payload)} bytes: {type(exc).__name__}: {exc}"
            ) from exc

    def _where(self, index: int, name: str | None) -> str:
        label = repr(name) if name is not None else "<unnamed>"
        return f"run {label} (invocation {self.invocation_id!r}, index {index})"

    def __repr__(self) -> str:
        return f"<Context invocation={self.invocation_id!r} handler={self._handler!r}>"


def _indexes(futs: list[RunFuture[Any]]) -> list[int]:
    return [fut.index for fut in futs]
