"""Async handlers: ``await ctx.run(fn)`` and friends, without blocking the event loop.

An async handler gets an :class:`AsyncContext`, the front door of an
:class:`AsyncAttempt`. The attempt keeps every rule of the sync one (index
taken when an operation is *called*, same journal format, same retries,
leases and misuse checks) and changes only where waiting happens:

- a coroutine closure runs on the loop; a plain function runs in a worker
  thread (never on the loop); retry backoff is ``asyncio.sleep``;
- journal writes go to the Runtime's journal writer, which batches the writes
  of every concurrent invocation into one durable commit and wakes each loop
  once per batch; the rare reads and compare-and-swaps (resuming, retries,
  lease renewals) run in a thread;
- a step cancelled while it runs (the task is cancelled, or ``asyncio.timeout``
  fires) journals nothing half-done, and ends the attempt: the invocation stays
  pending for ``arecover()``, since going on past a step that has no outcome
  would not replay the same way.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any, NoReturn, TypeVar, cast, overload

from runjournal.context._attempt import Attempt, Step, is_async_callable
from runjournal.context._cursor import describe
from runjournal.context._errors import ContextMisuseError, NonDeterminismError, TerminalError
from runjournal.context._futures import (
    FutureGroup,
    RunFuture,
    Slot,
    State,
    decision_entry,
    read_decision,
)
from runjournal.context._options import RunOptions, resolve_options
from runjournal.context._retry import FRESH, NOT_RETRIED, Failed, Succeeded, acall_with_retry
from runjournal.context._step import enter_step, leave_step
from runjournal.context._writer import JournalWriter
from runjournal.journal import (
    AppendEntry,
    Entry,
    EntryConflict,
    EntryKind,
    Failure,
    Invocation,
    InvocationStatus,
    UpdateInvocation,
    VersionConflict,
)

__all__ = ["AsyncAttempt", "AsyncContext", "AsyncRunFuture", "is_async_callable"]

T = TypeVar("T")

# The attempt whose coroutine closure runs in this context (tasks the closure
# starts inherit it): ctx operations there are refused.
_closure_of: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "runjournal_async_closure", default=None
)


class AsyncRunFuture(RunFuture[T]):
    """A side effect started by :meth:`AsyncContext.run_async`: ``await`` it.

    Pass it to ``ctx.wait_first`` / ``ctx.wait`` to choose among several the
    same way on every replay.
    """

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, T]:
        group = self._group
        assert isinstance(group, AsyncFutureGroup)
        return group.aresult(self._index).__await__()

    def result(self) -> NoReturn:
        """Refused: it would block the event loop. ``await`` the future instead."""
        raise ContextMisuseError(
            f"{self!r}.result() would block the event loop; in an async handler, "
            "`await` the future instead"
        )


class AsyncFutureGroup(FutureGroup):
    """The futures of one async attempt: asyncio tasks on the handler's loop."""

    future_type = AsyncRunFuture

    def start_task(
        self,
        index: int,
        name: str | None,
        work: Coroutine[Any, Any, tuple[Entry, BaseException | None]],
        outcome: Callable[[Entry, BaseException | None], Any],
    ) -> AsyncRunFuture[Any]:
        """Run ``work`` (execute ``fn`` with retries, journal the entry) as a task."""
        fut: AsyncRunFuture[Any] = AsyncRunFuture(self, index, name)
        slot = Slot(fut, outcome)
        with self._cond:
            self._slots[index] = slot

        async def run() -> None:
            try:
                entry, cause = await work
            except BaseException as exc:  # kept for await/wait; the task ends quietly
                self.fail(slot, exc)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            else:
                with self._cond:
                    self.settle_slot(slot, entry=entry, cause=cause)

        slot.submitted = asyncio.get_running_loop().create_task(run())
        return fut

    async def aresult(self, index: int) -> Any:
        slot = self._slots[index]
        if slot.state is State.RUNNING and slot.submitted is not None:
            await asyncio.wait([_task_of(slot)])
        slot.retrieved = True
        if slot.error is not None:
            raise slot.error
        assert slot.entry is not None
        return slot.outcome(slot.entry, slot.cause)

    async def _until(self, slots: Iterable[Slot], done: Callable[[], bool]) -> None:
        while not done():
            running = [_task_of(s) for s in slots if s.state is State.RUNNING and s.submitted]
            if not running:
                return
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    async def afirst(self, slots: list[Slot]) -> RunFuture[Any]:
        await self._until(slots, lambda: any(s.state is not State.RUNNING for s in slots))
        slot = min((s for s in slots if s.state is not State.RUNNING), key=_seq)
        return slot.journaled().future

    async def ain_completion_order(self, slots: list[Slot]) -> list[RunFuture[Any]]:
        def ready() -> bool:
            states = [s.state for s in slots]
            return State.FAILED in states or State.RUNNING not in states

        await self._until(slots, ready)
        return [slot.journaled().future for slot in sorted(slots, key=_seq)]

    async def achosen(self, slots: list[Slot], indexes: Iterable[int]) -> list[RunFuture[Any]]:
        by_index = {slot.future.index: slot for slot in slots}
        return [await self.afirst([by_index[i]]) for i in indexes]

    async def asettle(self, *, strict: bool) -> None:
        slots = self.slots()
        await self._until(slots, lambda: all(s.state is not State.RUNNING for s in slots))
        self.report_unretrieved(strict=strict)

    def abandon(self) -> None:
        for slot in self.slots():
            if slot.submitted is not None and slot.state is State.RUNNING:
                slot.submitted.cancel()


def _seq(slot: Slot) -> int:
    return slot.seq


def _task_of(slot: Slot) -> asyncio.Task[None]:
    task = slot.submitted
    assert isinstance(task, asyncio.Task)
    return task


class AsyncAttempt(Attempt):
    """One run of an async handler. Runs on one event loop; see the module docstring.

    Args (beyond :class:`Attempt`'s):
        writer: the Runtime's journal writer.
        aguard: the async form of ``guard``: None when the lease holds, else an
            awaitable renewal (off the loop) that raises LeaseLost if it is gone.
    """

    def __init__(
        self,
        *args: Any,
        writer: JournalWriter,
        aguard: Callable[[], Awaitable[None] | None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._futures = AsyncFutureGroup(
            self.invocation_id, self.executor, self.check_usable, self.handler
        )
        self._writer = writer
        self._aguard = aguard
        self._task = asyncio.current_task()
        self.interrupted: int | None = None  # the index of a step cancelled while it ran
        # Operations called whose awaiting has not begun (index -> what), so a forgotten
        # `await` is an error instead of a step that silently never runs.
        self.unawaited: dict[int, str] = {}
        # Steps running in other tasks than the handler's (asyncio.gather, create_task):
        # each future resolves when its step ends. The invocation waits for them.
        self._elsewhere: set[asyncio.Future[None]] = set()

    # -- who may act -------------------------------------------------------------

    def check_usable(self, label: str) -> None:
        super().check_usable(label)
        if _closure_of.get() is self:
            raise ContextMisuseError(
                f"{label} was called inside a run closure of invocation {self.invocation_id!r} "
                "(or a task it started); closures must not call ctx operations. Return a value "
                "from the closure and call ctx after it"
            )
        if self.interrupted is not None:
            raise ContextMisuseError(
                f"{label} was called after the step at index {self.interrupted} of invocation "
                f"{self.invocation_id!r} was cancelled; the attempt cannot go on (a replay "
                "would run that step): let the cancellation end the handler, and the "
                "invocation stays pending for arecover()"
            )
        if asyncio.current_task() is not self._task:
            raise ContextMisuseError(
                f"{label} was called from another task than the handler's of invocation "
                f"{self.invocation_id!r}; call ctx operations in the handler itself (their "
                "journal index is taken when they are called) and gather the awaitables, or "
                "use ctx.run_async"
            )

    def aguard_lease(self) -> Awaitable[None] | None:
        """None if this worker's lease holds; else what to await: a renewal off the
        loop, which raises :class:`LeaseLost` if the lease is gone."""
        return self._aguard()

    # -- steps ---------------------------------------------------------------------

    def arun(
        self,
        fn: Callable[[], Any],
        name: str | None,
        options: RunOptions | None,
        overrides: dict[str, Any],
    ) -> Coroutine[Any, Any, Any]:
        """``ctx.run`` in an async handler: the index is taken now; awaiting runs it."""
        self.check_usable("ctx.run()")
        opts = resolve_options(self._defaults, options, overrides)
        index, recorded = self._cursor.reserve(EntryKind.RUN, name)
        if recorded is None:
            self.unawaited[index] = describe(EntryKind.RUN, name)
        return self._astep(fn, index, name, opts, recorded)

    async def _astep(
        self,
        fn: Callable[[], Any],
        index: int,
        name: str | None,
        opts: RunOptions,
        recorded: Entry | None,
    ) -> Any:
        self.unawaited.pop(index, None)
        cause = None
        if recorded is not None and self.tracing is not None:
            self.tracing.replayed(name, index)
        if recorded is None:
            ended = None
            if asyncio.current_task() is not self._task:
                ended = asyncio.get_running_loop().create_future()
                self._elsewhere.add(ended)
            try:
                entry, cause = await self._aexecute(fn, index, name, opts)
                recorded = await self._ajournal(entry)
            except asyncio.CancelledError:
                self.interrupted = index
                raise
            finally:
                if ended is not None:
                    self._elsewhere.discard(ended)
                    ended.set_result(None)
            if recorded is not entry:
                cause = None
        return self._outcome(recorded, opts.codec, cause)

    def arun_async(
        self,
        fn: Callable[[], Any],
        name: str | None,
        options: RunOptions | None,
        overrides: dict[str, Any],
    ) -> AsyncRunFuture[Any]:
        """``ctx.run_async`` in an async handler: a task, started now."""
        self.check_usable("ctx.run_async()")
        if not callable(fn):
            raise TypeError(
                f"run_async {name!r}: fn must be a callable taking no arguments, got {fn!r}"
            )
        opts = resolve_options(self._defaults, options, overrides)
        index, recorded = self._cursor.reserve(EntryKind.RUN, name)
        codec = opts.codec

        def outcome(entry: Entry, cause: BaseException | None) -> Any:
            return self._outcome(entry, codec, cause)

        if recorded is not None:
            fut = self._futures.resolved(index, name, recorded, outcome)
            assert isinstance(fut, AsyncRunFuture)
            return fut

        async def work() -> tuple[Entry, BaseException | None]:
            entry, cause = await self._aexecute(fn, index, name, opts)
            # The future completes only once this returns: its entry is durable.
            recorded = await self._ajournal(entry)
            return recorded, cause if recorded is entry else None

        group = self._futures
        assert isinstance(group, AsyncFutureGroup)
        return group.start_task(index, name, work(), outcome)

    def await_first(self, futs: tuple[RunFuture[Any], ...]) -> Coroutine[Any, Any, Any]:
        """``ctx.wait_first`` in an async handler: the index is taken now."""
        self.check_usable("ctx.wait_first()")
        members = self._futures.check_members("wait_first", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT_FIRST, None)
        if recorded is None:
            self.unawaited[index] = "ctx.wait_first()"
        return self._await_first(index, recorded, members)

    async def _await_first(
        self, index: int, recorded: Entry | None, members: list[Slot]
    ) -> RunFuture[Any]:
        self.unawaited.pop(index, None)
        group = self._futures
        assert isinstance(group, AsyncFutureGroup)
        if recorded is None:
            with self._interruptible(index):
                renewal = self.aguard_lease()
                if renewal is not None:
                    await renewal
                winner = await group.afirst(members)
                entry = decision_entry(
                    index, EntryKind.WAIT_FIRST, _indexes(members), [winner.index]
                )
                recorded = await self._ajournal(entry)
            if recorded is entry:
                return winner
        [winner] = await group.achosen(members, self.decision(recorded, members))
        return winner

    def await_all(self, futs: tuple[RunFuture[Any], ...]) -> AsyncIterator[RunFuture[Any]]:
        """``ctx.wait`` in an async handler: the index is taken now; iterating waits."""
        self.check_usable("ctx.wait()")
        members = self._futures.check_members("wait", futs)
        index, recorded = self._cursor.reserve(EntryKind.WAIT, None)
        if recorded is None:
            self.unawaited[index] = "ctx.wait()"

        async def in_order() -> AsyncIterator[RunFuture[Any]]:
            for fut in await self._await_all(index, recorded, members):
                yield fut

        return in_order()

    async def _await_all(
        self, index: int, recorded: Entry | None, members: list[Slot]
    ) -> list[RunFuture[Any]]:
        self.unawaited.pop(index, None)
        group = self._futures
        assert isinstance(group, AsyncFutureGroup)
        if recorded is None:
            with self._interruptible(index):
                renewal = self.aguard_lease()
                if renewal is not None:
                    await renewal
                ordered = await group.ain_completion_order(members)
                entry = decision_entry(
                    index, EntryKind.WAIT, _indexes(members), [f.index for f in ordered]
                )
                recorded = await self._ajournal(entry)
            if recorded is entry:
                return ordered
        return await group.achosen(members, self.decision(recorded, members))

    def decision(self, recorded: Entry, members: list[Slot]) -> list[int]:
        """The indexes a journaled wait/wait_first decision chose among ``members``."""
        journaled_members, chosen = read_decision(recorded)
        asked = _indexes(members)
        if sorted(journaled_members) != sorted(asked):
            raise NonDeterminismError(
                self.invocation_id,
                recorded.index,
                recorded=f"{describe(recorded.kind, None)} among indexes {journaled_members}",
                asked=f"{recorded.kind.value} among indexes {sorted(asked)}",
            )
        return chosen

    def never_awaited(self) -> str | None:
        """Why the handler may not complete: ctx operations it called and never awaited."""
        if not self.unawaited:
            return None
        which = ", ".join(f"index {i} ({what})" for i, what in sorted(self.unawaited.items()))
        return (
            f"ctx operations were called and never awaited: {which}; in an async handler "
            "each is awaited (`await ctx.run(...)`, `await ctx.run_void(...)`, `await "
            "ctx.wait_first(...)`, `async for fut in ctx.wait(...)`), or it does not run. "
            "The invocation stays pending"
        )

    def _interruptible(self, index: int) -> _Interruptible:
        return _Interruptible(self, index)

    # -- the end -----------------------------------------------------------------

    async def asettle(self, *, strict: bool) -> None:
        """Wait until every future, and every step running in another task, is journaled
        or has failed (see :meth:`Attempt.settle`)."""
        if self._elsewhere:
            await asyncio.wait(set(self._elsewhere))
        group = self._futures
        assert isinstance(group, AsyncFutureGroup)
        await group.asettle(strict=strict)

    async def acomplete(
        self,
        status: InvocationStatus,
        *,
        output: bytes | None = None,
        failure: Failure | None = None,
    ) -> Invocation:
        """:meth:`Attempt.complete` through the journal writer."""
        while True:
            done = self.finished_record(status, output=output, failure=failure)
            try:
                stored: Invocation = await self._writer.write(UpdateInvocation(done))
            except VersionConflict:
                latest = await asyncio.to_thread(self.reread)
                if latest.status is not InvocationStatus.PENDING:
                    return latest
                continue
            self.adopt_record(stored)
            return stored

    # -- one step ------------------------------------------------------------------

    async def _aexecute(
        self, fn: Callable[[], Any], index: int, name: str | None, opts: RunOptions
    ) -> tuple[Entry, BaseException | None]:
        resume, progress = self.resume_for(fn, index, name)
        first: tuple[Exception, float] | None = None
        if resume is FRESH and not opts.at_most_once and is_async_callable(fn):
            # The common case, kept lean: a coroutine closure's first attempt, with
            # no start marker; only a failure builds the retry machinery.
            renewal = self.aguard_lease()
            if renewal is not None:
                await renewal
            started = self.clock.monotonic()
            marker = _closure_of.set(self)
            token = enter_step(self.invocation_id, index, name, 1)
            try:
                if self.tracing is None:
                    value = await fn()
                else:
                    with self.tracing.step(name, index, 1):
                        value = await fn()
            except TerminalError as exc:
                return self.entry_for(Failed(exc, 1), index, name, opts)
            except NOT_RETRIED:
                raise
            except Exception as exc:
                first = (exc, self.clock.monotonic() - started)
            finally:
                leave_step(token)
                _closure_of.reset(marker)
            if first is None:  # encoded outside the try: a codec error is never retried
                return self.entry_for(Succeeded(value, 1), index, name, opts)
        step = AsyncStep(self, fn, index, name, opts, progress)
        outcome = await acall_with_retry(
            step.acall,
            step.make_schedule,
            resume=resume,
            clock=self.clock,
            sleep=self._sleep,
            before_attempt=step.abefore,
            after_failure=step.aafter,
            first_failure=first,
        )
        return self.entry_for(outcome, index, name, opts)

    async def _sleep(self, seconds: float) -> None:
        if hasattr(self.clock, "asleep"):
            await self.clock.asleep(seconds)
        elif type(self.clock).__name__ == "SystemClock":
            await asyncio.sleep(seconds)
        else:
            self.clock.sleep(seconds)  # a fake clock: it does not block

    async def _ajournal(self, entry: Entry) -> Entry:
        try:
            await self._writer.write(AppendEntry(self.invocation_id, entry))
        except EntryConflict:
            return await asyncio.to_thread(self.adopt, entry)
        self._cursor.note(entry)
        return entry

    def run_closure_in_thread(self, step: Step, number: int) -> Any:
        """Where a plain-function closure of an async handler runs: a worker thread."""
        return step.call(number)


class _Interruptible:
    """Marks the attempt interrupted if the step at ``index`` is cancelled while it runs."""

    __slots__ = ("attempt", "index")

    def __init__(self, attempt: AsyncAttempt, index: int) -> None:
        self.attempt = attempt
        self.index = index

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            self.attempt.interrupted = self.index


class AsyncStep(Step):
    """A step of an async handler: a coroutine closure on the loop, a plain one in a thread."""

    __slots__ = ("is_coroutine",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.in_owner = False  # a plain closure runs in a worker thread, not the handler's
        self.is_coroutine = is_async_callable(self.fn)

    async def acall(self, number: int) -> Any:
        attempt = self.attempt
        if not self.is_coroutine:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(attempt.executor, self.call, number)
            if not inspect.isawaitable(result):
                return result
            awaitable: Awaitable[Any] = result  # a plain function that returned a coroutine
        else:
            awaitable = self.fn()
        marker = _closure_of.set(attempt)
        token = enter_step(attempt.invocation_id, self.index, self.name, number)
        try:
            if attempt.tracing is None or not self.is_coroutine:
                return await awaitable  # a plain closure's span was its thread's
            with attempt.tracing.step(self.name, self.index, number):
                return await awaitable
        finally:
            leave_step(token)
            _closure_of.reset(marker)

    def abefore(self, number: int) -> Awaitable[None] | None:
        """What must happen before attempt ``number``, if anything: the lease checked off
        the loop when it needs a renewal, and the start marker of a retry or of an
        at-most-once step (see :meth:`Step.before`)."""
        attempt = self.attempt
        assert isinstance(attempt, AsyncAttempt)
        renewal = attempt.aguard_lease()
        if not (self.opts.at_most_once or number > 1):
            return renewal
        return self._marked(renewal, number)

    async def _marked(self, renewal: Awaitable[None] | None, number: int) -> None:
        if renewal is not None:
            await renewal
        await asyncio.to_thread(self.attempt.save_progress, self.marker(number))

    def aafter(self, number: int, exc: Exception) -> Awaitable[None] | None:
        progress = self.failed(number, exc)
        if progress is None:
            return None
        return asyncio.to_thread(self.attempt.save_progress, progress)


def _indexes(slots: list[Slot]) -> list[int]:
    return [slot.future.index for slot in slots]


async def _discard(awaitable: Awaitable[Any]) -> None:
    await awaitable


class AsyncContext:
    """Durable operations for one attempt of an ``async def`` handler.

    The same operations as :class:`Context`, awaited: ``await ctx.run(fn)``
    (``fn`` a coroutine function or a plain one, which runs in a worker
    thread), ``await ctx.run_void(fn)``, ``fut = ctx.run_async(fn)`` then
    ``await fut``, ``await ctx.wait_first(*futs)``, ``async for fut in
    ctx.wait(*futs)``. Each takes its journal index when it is *called*, so
    ``await asyncio.gather(ctx.run(a), ctx.run(b))`` replays the same way.
    """

    def __init__(self, attempt: AsyncAttempt) -> None:
        self._attempt = attempt

    @property
    def invocation_id(self) -> str:
        """The id this invocation is journaled under."""
        return self._attempt.invocation_id

    @property
    def handler_name(self) -> str:
        """The registered name of the running handler."""
        return self._attempt.handler

    def is_replaying(self) -> bool:
        """Whether later steps are already journaled (for logging, not for logic)."""
        return self._attempt.is_replaying()

    # Overloads, not one `Callable[[], Awaitable[T]] | Callable[[], T]`: from that union
    # mypy cannot solve T for a coroutine function (it asks for an annotation).
    @overload
    def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> Coroutine[Any, Any, T]: ...

    @overload
    def run(
        self,
        fn: Callable[[], T],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> Coroutine[Any, Any, T]: ...

    def run(
        self,
        fn: Callable[[], Any],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> Coroutine[Any, Any, Any]:
        """Run ``fn`` once successfully; ``await`` its journaled result (as :meth:`Context.run`)."""
        return self._attempt.arun(fn, name, options, option_kwargs)

    def run_void(
        self,
        fn: Callable[[], object],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> Coroutine[Any, Any, None]:
        """Like :meth:`run` for a side effect whose value is not kept."""

        async def call_async() -> None:
            await fn()  # type: ignore[misc]

        def call() -> Awaitable[None] | None:
            result = fn()
            # A plain function may return an awaitable (`lambda: send(x)`), as with run:
            # it runs (on the loop); its value is not kept.
            return _discard(result) if inspect.isawaitable(result) else None

        self._attempt.check_usable("ctx.run_void()")
        inner: Any = call_async if is_async_callable(fn) else call
        return self._void(self._attempt.arun(inner, name, options, option_kwargs))

    @staticmethod
    async def _void(step: Coroutine[Any, Any, Any]) -> None:
        await step

    @overload
    def run_async(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> AsyncRunFuture[T]: ...

    @overload
    def run_async(
        self,
        fn: Callable[[], T],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> AsyncRunFuture[T]: ...

    def run_async(
        self,
        fn: Callable[[], Any],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> AsyncRunFuture[Any]:
        """Start ``fn`` now as a task; ``await`` the future for its journaled result."""
        return self._attempt.arun_async(fn, name, options, option_kwargs)

    def wait_first(self, *futs: AsyncRunFuture[Any]) -> Coroutine[Any, Any, AsyncRunFuture[Any]]:
        """``await`` the first of ``futs`` to complete, the same one on every replay."""
        # The futures of an async attempt are AsyncRunFutures (checked when called).
        return cast("Coroutine[Any, Any, AsyncRunFuture[Any]]", self._attempt.await_first(futs))

    def wait(self, *futs: AsyncRunFuture[Any]) -> AsyncIterator[AsyncRunFuture[Any]]:
        """``async for`` over ``futs`` in completion order, the same on every replay."""
        return cast("AsyncIterator[AsyncRunFuture[Any]]", self._attempt.await_all(futs))

    def __repr__(self) -> str:
        return (
            f"<AsyncContext invocation={self._attempt.invocation_id!r} "
            f"handler={self._attempt.handler!r}>"
        )
