"""One attempt at running an invocation: the object the Runtime drives.

An :class:`Attempt` owns everything that lives exactly as long as one run of
a handler: the replay cursor, the futures started, which thread runs the
handler, whether a closure is running, and whether the attempt has ended.
The :class:`~runjournal.context.Context` a handler gets is a thin front door
onto it; the Runtime starts, settles and ends it through public methods.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

import attrs

from runjournal.context._cursor import ReplayCursor, describe
from runjournal.context._errors import (
    ContextMisuseError,
    LeaseLost,
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
from runjournal.context._log import emit
from runjournal.context._options import RunOptions, resolve_options
from runjournal.context._retry import (
    FRESH,
    Clock,
    Failed,
    Resume,
    RetryDetails,
    RetryHook,
    RetrySchedule,
    Succeeded,
    call_with_retry,
)
from runjournal.context._step import enter_step, leave_step
from runjournal.context._tracing import AttemptTracing
from runjournal.journal import (
    Codec,
    CodecError,
    Entry,
    EntryConflict,
    EntryKind,
    Failure,
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalBackend,
    StepProgress,
    VersionConflict,
    decode_value,
    encode_value,
)

__all__ = ["Attempt", "Step", "by_index", "is_async_callable"]

#: The longest error message kept in a step's journaled progress.
_ERROR_CHARS = 500


_CO_COROUTINE = inspect.CO_COROUTINE


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine (async def, a partial of one, an
    object with an async ``__call__``)."""
    code = getattr(fn, "__code__", None)
    if code is not None:  # a plain function or lambda: the fast answer (every step asks)
        return bool(code.co_flags & _CO_COROUTINE)
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (the method, not callability)
    )


class Attempt:
    """One run of a handler for one invocation. Thread-safe where it must be.

    The thread that builds the attempt is the one that runs the handler: ctx
    operations are accepted from it alone, and not while one of this
    attempt's closures runs in it. Closures of ``run_async`` run on other
    threads, so they, and any thread a closure starts, are refused too.

    Args:
        backend: the journal.
        record: the invocation's record as this worker holds it (its lease).
        recorded: the entries already journaled (replayed by index).
        handler: the handler's registered name.
        defaults: the run options a step starts from.
        clock: where retries read time and sleep.
        on_retry: called after each failed attempt of a step.
        executor: runs ``run_async`` closures (None: ``run_async`` is refused).
        guard: raises :class:`LeaseLost` if this worker's lease no longer holds;
            called before every ctx operation and every closure attempt.
        rng: draws retry jitter.
    """

    def __init__(
        self,
        backend: JournalBackend,
        record: Invocation,
        recorded: Iterable[Entry],
        *,
        handler: str,
        defaults: RunOptions,
        clock: Clock,
        on_retry: RetryHook | None = None,
        executor: Executor | None = None,
        guard: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        invocation_id = record.id
        self.invocation_id = invocation_id
        self.handler = handler
        self._record = record
        self._record_lock = threading.Lock()
        self._guard = guard
        self._backend = backend
        self._cursor = ReplayCursor(backend, invocation_id, recorded)
        self._defaults = defaults
        self.clock = clock
        self.on_retry = on_retry
        self.rng = rng
        self._max_payload = backend.capabilities.max_payload_bytes
        self.executor = executor
        self.tracing: AttemptTracing | None = None  # set by the Runtime when it traces
        self._futures = FutureGroup(invocation_id, executor, self.check_usable, handler)
        self.owner = threading.get_ident()  # the thread running the handler
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
        if threading.get_ident() != self.owner:
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

    @property
    def record(self) -> Invocation:
        """The invocation's record as last read or written by this attempt."""
        return self._record

    def _may_act(self, label: str) -> None:
        """A ctx operation that may journal or start closures: usable, and the lease holds."""
        self.check_usable(label)
        if self._guard is not None:
            self._guard()

    # -- steps ---------------------------------------------------------------------

    def run(
        self,
        fn: Callable[[], Any],
        name: str | None,
        options: RunOptions | None,
        overrides: dict[str, Any],
    ) -> Any:
        """``ctx.run``: the journaled outcome of ``fn`` (calling it if not yet journaled)."""
        self._may_act("ctx.run()")
        opts = resolve_options(self._defaults, options, overrides)
        index, recorded = self._cursor.reserve(EntryKind.RUN, name)
        cause = None
        if recorded is not None and self.tracing is not None:
            self.tracing.replayed(name, index)
        if recorded is None:
            entry, cause = self._execute(fn, index, name, opts)
            recorded = self._journal(entry)
            if recorded is not entry:
                cause = None
        return self._outcome(recorded, opts.codec, cause)

    def run_async(
        self,
        fn: Callable[[], Any],
        name: str | None,
        options: RunOptions | None,
        overrides: dict[str, Any],
    ) -> RunFuture[Any]:
        """``ctx.run_async``: a future of ``fn``'s journaled outcome."""
        self._may_act("ctx.run_async()")
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
            recorded = self._journal(entry)
            return recorded, cause if recorded is entry else None

        return self._futures.start(index, name, task, outcome)

    def wait_first(self, futs: tuple[RunFuture[Any], ...]) -> RunFuture[Any]:
        """``ctx.wait_first``: the first future to complete, journaled."""
        self._may_act("ctx.wait_first()")
        members = self._futures.check_members("wait_first", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT_FIRST, None)
        if recorded is not None:
            [winner] = self._replayed(recorded, members)
            return winner
        winner = self._futures.first(members)
        entry = decision_entry(index, EntryKind.WAIT_FIRST, _indexes(members), [winner.index])
        recorded = self._journal(entry)
        if recorded is not entry:
            [winner] = self._replayed(recorded, members)
        return winner

    def wait(self, futs: tuple[RunFuture[Any], ...]) -> Iterator[RunFuture[Any]]:
        """``ctx.wait``: the futures in completion order, journaled before any is handed out."""
        self._may_act("ctx.wait()")
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

    def complete(
        self,
        status: InvocationStatus,
        *,
        output: bytes | None = None,
        failure: Failure | None = None,
    ) -> Invocation:
        """Record the invocation's outcome with compare-and-swap; the first finisher wins.

        Returns the finished record: this attempt's, or the one another worker
        recorded first.

        Raises:
            LeaseLost: another worker took the invocation over and has not
                finished it.
        """
        while True:
            done = self.finished_record(status, output=output, failure=failure)
            try:
                stored = self._backend.update_invocation(done)
            except VersionConflict:
                latest = self.reread()
                if latest.status is not InvocationStatus.PENDING:
                    return latest
                continue
            self.adopt_record(stored)
            return stored

    def finished_record(
        self,
        status: InvocationStatus,
        *,
        output: bytes | None = None,
        failure: Failure | None = None,
    ) -> Invocation:
        """The record that finishes the invocation (to compare-and-swap in)."""
        return attrs.evolve(
            self._record,
            status=status,
            output=output,
            failure=failure,
            steps=(),
            updated_at=time.time(),
        )

    def adopt_record(self, stored: Invocation) -> None:
        """Keep ``stored`` as this attempt's view of the record, if it is newer."""
        with self._record_lock:
            if stored.version > self._record.version:
                self._record = stored

    # -- the invocation record -------------------------------------------------------

    def reread(self) -> Invocation:
        """The record as stored now; :class:`LeaseLost` if another worker holds it.

        A finished record is returned whoever finished it.
        """
        latest = self._backend.get_invocation(self.invocation_id)
        if latest is None:
            raise InvocationNotFound(self.invocation_id)
        mine = self._record.lease
        if latest.status is InvocationStatus.PENDING and latest.lease != mine:
            owner = latest.lease.owner if latest.lease is not None else "nobody"
            raise LeaseLost(self.invocation_id, f"it is now held by {owner!r}")
        with self._record_lock:
            if latest.version > self._record.version:
                self._record = latest
        return latest

    def _journal(self, entry: Entry) -> Entry:
        """Append ``entry``; after a lost race, the entry recorded first.

        Raises:
            LeaseLost: the race was lost because another worker owns the
                invocation now (this one must stop).
        """
        try:
            self._cursor.record(entry)
        except EntryConflict:
            return self.adopt(entry)
        return entry

    def adopt(self, entry: Entry) -> Entry:
        """After ``entry``'s append met an entry another (stale) worker wrote first: that
        entry, which this rightful owner goes on with, as a replay would.

        Raises:
            LeaseLost: the race was lost because another worker owns the
                invocation now, or finished it (this one must stop).
        """
        latest = self.reread()
        if latest.status is not InvocationStatus.PENDING:
            raise LeaseLost(self.invocation_id, "another worker finished it") from None
        recorded = self._cursor.fetch(entry.index, entry.kind, entry.name)
        emit(
            logging.WARNING,
            "invocation %r: %s at index %d was recorded first by another worker (it ran "
            "twice); this worker goes on with the recorded outcome",
            self.invocation_id,
            describe(entry.kind, entry.name),
            entry.index,
            invocation_id=self.invocation_id,
            handler=self.handler,
            step=entry.name,
            index=entry.index,
        )
        return recorded

    # -- running one step ----------------------------------------------------------

    def _execute(
        self, fn: Callable[[], Any], index: int, name: str | None, opts: RunOptions
    ) -> tuple[Entry, BaseException | None]:
        """Call ``fn`` with retries; return the entry to journal (not yet written)
        and, for a failure, the original error to chain to what is raised.

        Attempts already spent (journaled in the invocation's step progress by
        an earlier attempt of the invocation) count against the budget.
        """
        resume, progress = self.resume_for(fn, index, name)
        if is_async_callable(fn):
            raise ContextMisuseError(
                f"run {name!r} (invocation {self.invocation_id!r}): fn is a coroutine "
                "function, and this handler is a plain def; make the handler `async def` "
                "and `await ctx.run(fn)`"
            )
        step = Step(self, fn, index, name, opts, progress)
        outcome = call_with_retry(
            step.call,
            step.make_schedule,
            resume=resume,
            clock=self.clock,
            before_attempt=step.before,
            after_failure=step.after,
        )
        if isinstance(outcome, Succeeded) and inspect.iscoroutine(outcome.value):
            outcome.value.close()  # never started: nothing ran
            raise ContextMisuseError(
                f"run {name!r} (invocation {self.invocation_id!r}): fn returned a coroutine, "
                "and this handler is a plain def; make the handler `async def` and "
                "`await ctx.run(fn)`"
            )
        return self.entry_for(outcome, index, name, opts)

    def resume_for(
        self, fn: Callable[[], Any], index: int, name: str | None
    ) -> tuple[Resume, StepProgress | None]:
        """Where a step's retries start, from its journaled progress (None: never tried)."""
        if not callable(fn):
            raise TypeError(f"run {name!r}: fn must be a callable taking no arguments, got {fn!r}")
        progress = self._record.progress(index) if self._record.steps else None
        if progress is None:
            return FRESH, None
        resume = Resume(
            attempts=progress.attempts,
            elapsed=max(0.0, time.time() - progress.first_started_at),
            interrupted=progress.in_flight,
            last_error=(
                f"{progress.last_error.type_name}: {progress.last_error.message}"
                if progress.last_error is not None
                else None
            ),
        )
        return resume, progress

    def entry_for(
        self, outcome: Succeeded | Failed, index: int, name: str | None, opts: RunOptions
    ) -> tuple[Entry, BaseException | None]:
        """The entry a step's outcome is journaled as, and the error to chain to."""
        codec = opts.codec
        if isinstance(outcome, Failed):
            failure = failure_of(outcome.error)
            entry = Entry(
                index, EntryKind.RUN, name, None, codec.name, failure, time.time(), outcome.attempts
            )
            return entry, outcome.error
        payload = self._encode(outcome.value, codec, index, name)
        entry = Entry(
            index, EntryKind.RUN, name, payload, codec.name, None, time.time(), outcome.attempts
        )
        return entry, None

    # -- what a step asks of its attempt -------------------------------------------

    def closure_starts(self, in_owner: bool) -> None:
        """A closure of this attempt starts (in the handler's thread if ``in_owner``)."""
        with self._closures_lock:
            self._closures += 1
            if in_owner:
                self._in_closure = True

    def closure_ends(self, in_owner: bool) -> None:
        """That closure ended."""
        with self._closures_lock:
            self._closures -= 1
            if in_owner:
                self._in_closure = False

    def retried(self, details: RetryDetails) -> None:
        """A step attempt failed and will be retried: trace it, then the user's hook."""
        if self.tracing is not None:
            self.tracing.retry(details)
        if self.on_retry is not None:
            self.on_retry(details)

    def guard_lease(self) -> None:
        """Raise :class:`LeaseLost` unless this worker still holds the lease."""
        if self._guard is not None:
            self._guard()

    def save_progress(self, progress: StepProgress) -> None:
        """Make a step's progress durable on the invocation record (compare-and-swap)."""
        while True:
            with self._record_lock:
                current = self._record
            # Progress of steps journaled since is obsolete: dropped in the same write,
            # so the record stays as small as the steps still open.
            still_open = [
                step
                for step in current.steps
                if step.index != progress.index and not self._cursor.has(step.index)
            ]
            try:
                stored = self._backend.update_invocation(
                    attrs.evolve(
                        current,
                        steps=sorted([*still_open, progress], key=by_index),
                        updated_at=time.time(),
                    )
                )
            except VersionConflict:
                # Another step of this attempt (a future) wrote first, or a takeover.
                self.reread()
                continue
            with self._record_lock:
                if stored.version > self._record.version:
                    self._record = stored
            return

    def _encode(self, value: Any, codec: Codec, index: int, name: str | None) -> bytes:
        payload = encode_value(codec, value, lambda: f"{self._where(index, name)}: the result")
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
                f"but the code now asks for {codec.name!r}; keep the codec a step was recorded "
                "with"
            )
        if entry.payload is None:
            raise CodecError(
                f"{self._where(entry.index, entry.name)}: the journaled entry has no payload"
            )
        return decode_value(codec, entry.payload, lambda: self._where(entry.index, entry.name))

    def _where(self, index: int, name: str | None) -> str:
        label = repr(name) if name is not None else "<unnamed>"
        return f"run {label} (invocation {self.invocation_id!r}, index {index})"


def by_index(step: StepProgress) -> int:
    return step.index


def _indexes(slots: list[Slot]) -> list[int]:
    return [slot.future.index for slot in slots]


class Step:
    """One step's closure, run with retries for an attempt: the hooks the retry loop calls."""

    __slots__ = (
        "attempt",
        "first_started_at",
        "fn",
        "in_owner",
        "index",
        "last_error",
        "name",
        "opts",
        "schedule",
    )

    def __init__(
        self,
        attempt: Attempt,
        fn: Callable[[], Any],
        index: int,
        name: str | None,
        opts: RunOptions,
        progress: StepProgress | None,
    ) -> None:
        self.attempt = attempt
        self.fn = fn
        self.index = index
        self.name = name
        self.opts = opts
        self.in_owner = threading.get_ident() == attempt.owner
        self.first_started_at = progress.first_started_at if progress is not None else None
        self.schedule: RetrySchedule | None = None
        self.last_error: Failure | None = progress.last_error if progress is not None else None

    def make_schedule(self, resume: Resume) -> RetrySchedule:
        """The step's retry state, built when first needed (a retry, a resumed step)."""
        attempt = self.attempt
        self.schedule = RetrySchedule(
            self.opts,
            name=self.name,
            clock=attempt.clock,
            resume=resume,
            rng=attempt.rng,
            on_retry=attempt.retried,
            invocation_id=attempt.invocation_id,
            index=self.index,
            handler=attempt.handler,
        )
        return self.schedule

    def call(self, number: int) -> Any:
        """Run the closure once, as attempt ``number``."""
        attempt = self.attempt
        # The attempt knows a closure runs, whatever threads it starts.
        attempt.closure_starts(self.in_owner)
        token = enter_step(attempt.invocation_id, self.index, self.name, number)
        try:
            if attempt.tracing is None:
                return self.fn()
            with attempt.tracing.step(self.name, self.index, number):
                return self.fn()
        finally:
            leave_step(token)
            attempt.closure_ends(self.in_owner)

    def before(self, number: int) -> None:
        """Before attempt ``number``: no closure starts without the lease; a start
        marker is durable first, so an attempt whose worker dies in it still counts.
        Every attempt of an at-most-once step has one; other steps' retries too
        (a step that succeeds at its first attempt writes nothing but its entry)."""
        if number > 1 or not self.in_owner:  # the ctx operation just checked the lease
            self.attempt.guard_lease()
        if self.opts.at_most_once or number > 1:
            self.attempt.save_progress(self.marker(number))

    def marker(self, number: int) -> StepProgress:
        """The start marker of attempt ``number``."""
        return StepProgress(
            self.index, number, self.started(), in_flight=True, last_error=self.last_error
        )

    def after(self, number: int, exc: Exception) -> None:
        """Attempt ``number`` failed and will be retried: make that durable first."""
        progress = self.failed(number, exc)
        if progress is not None:
            self.attempt.save_progress(progress)

    def failed(self, number: int, exc: Exception) -> StepProgress | None:
        """Attempt ``number`` failed with ``exc``: the progress to save, if any."""
        self.last_error = Failure(type(exc).__qualname__, f"{exc}"[:_ERROR_CHARS])
        if self.opts.at_most_once:
            return None  # its start marker already counts the attempt
        return StepProgress(self.index, number, self.started(), last_error=self.last_error)

    def started(self) -> float:
        """When the first attempt started (wall clock)."""
        if self.first_started_at is None:
            elapsed = self.schedule.elapsed() if self.schedule is not None else 0.0
            self.first_started_at = time.time() - elapsed
        return self.first_started_at
