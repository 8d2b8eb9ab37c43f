"""The Runtime: registers handlers, runs invocations under leases, recovers orphans."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import attrs

from runjournal.context._async import AsyncAttempt, AsyncContext, is_async_callable
from runjournal.context._attempt import Attempt
from runjournal.context._context import Context
from runjournal.context._errors import (
    ContextMisuseError,
    HandlerNotFound,
    InvocationMismatch,
    InvocationTimeout,
    LeaseLost,
    TerminalError,
    failure_of,
    terminal_from,
)
from runjournal.context._ids import new_invocation_id
from runjournal.context._lease import (
    RELEASED,
    WORKER_PREFIX,
    Held,
    Liveness,
    default_worker_id,
    process_gone,
)
from runjournal.context._log import emit
from runjournal.context._options import Duration, RunOptions, seconds
from runjournal.context._purge import FINISHED, PurgeStep, Statuses, purge
from runjournal.context._retry import Clock, RetryHook, SystemClock
from runjournal.context._tracing import Tracing, tracing_available
from runjournal.context._writer import JournalWriter
from runjournal.journal import (
    Codec,
    CreateInvocation,
    Entry,
    Invocation,
    InvocationStatus,
    JournalBackend,
    Lease,
    VersionConflict,
    decode_value,
    encode_value,
)

__all__ = ["HandlerSpec", "RecoveryResult", "Runtime"]

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Any, Any], Any]  # fn(ctx, input); ctx a Context or AsyncContext

#: The longest pause between two looks at an invocation another worker runs.
_MAX_POLL = 1.0
#: The longest pause between two looks at an invocation another task of this worker runs.
_LOCAL_POLL = 0.05


@attrs.frozen
class HandlerSpec:
    """A registered handler: its stable name, function and input/output codec.

    ``is_async``: an ``async def`` handler (it gets an :class:`AsyncContext`).
    """

    name: str
    fn: Handler
    codec: Codec
    is_async: bool = False


@attrs.frozen
class RecoveryResult:
    """What :meth:`Runtime.recover` did with one pending invocation.

    Attributes:
        invocation_id: the invocation.
        handler: its handler's name.
        status: its status afterwards (PENDING if it was skipped, is still
            running, or failed retryably).
        output: its output, when it completed.
        error: what the attempt raised (a terminal failure, or why it is
            still pending).
        skipped: why it was not run here (another live worker holds it, its
            handler is not registered here, it already runs in this process),
            or None.
        running: it still runs in the background (``recover(timeout=...)``
            returned before it finished).
    """

    invocation_id: str
    handler: str
    status: InvocationStatus
    output: Any = None
    error: BaseException | None = None
    skipped: str | None = None
    running: bool = False


@attrs.frozen
class _Done:
    """An invocation's outcome, as invoke returns it."""

    value: Any


@attrs.frozen
class _Mine:
    """This caller runs the invocation here; ``event`` is set when it stops."""

    event: threading.Event


def _open_default(url: str | Mapping[str, Any] | None) -> JournalBackend:
    # The engine is chosen at the edge: `backends` is looked up when a Runtime
    # is built without a ready backend, so `context` never imports an engine.
    backends = importlib.import_module("runjournal.backends")
    backend: JournalBackend = backends.open_backend(url)
    return backend


_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for runtime in list(_runtimes):
        runtime.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Runtime:
    """Runs durable handlers against one journal, as one worker among many.

    Args:
        backend: a ready :class:`runjournal.journal.JournalBackend`; or a URL
            / config mapping for ``runjournal.open_backend``; or None for
            ``$RUNJOURNAL_URL``, else ``lmdb://.runjournal``. A backend the
            Runtime opened itself is closed by :meth:`close`.
        codec: the default codec of handler inputs and outputs (JSON).
        options: the default :class:`RunOptions` of every run.
        clock: where retries read time and sleep (tests pass a fake one).
        on_retry: called with a :class:`RetryDetails` after each failed attempt.
        max_workers: how many ``ctx.run_async`` closures run at once, over
            all invocations of this Runtime (8); more wait their turn.
            :meth:`close` waits for the running ones.
        worker_id: this worker's name in leases; unique among live workers
            (default: ``host/pid/random``). A worker restarted under the same
            id takes back the invocations it held at once.
        lease: how long a worker's leases last without a heartbeat (30 s;
            float seconds or timedelta). Another worker takes over an
            invocation only after its owner's lease expired. A heartbeat
            thread renews all of this worker's leases with one write every
            third of it, while the worker runs anything.
        max_recoveries: how many invocations :meth:`recover` and
            :meth:`start_recovery` run at once (8).
        rng: draws retry jitter (seed it in tests).
        tracing: OpenTelemetry spans for invocations and steps (see
            the README's "Logs and traces"); None (default) traces when
            ``opentelemetry-api`` is installed (the ``otel`` extra).
        tracer_provider: where the spans go (default: the global provider).
        trace_replays: also make a span for each replayed step.
    """

    def __init__(
        self,
        backend: JournalBackend | str | Mapping[str, Any] | None = None,
        *,
        codec: Codec | None = None,
        options: RunOptions | None = None,
        clock: Clock | None = None,
        on_retry: RetryHook | None = None,
        max_workers: int = 8,
        worker_id: str | None = None,
        lease: Duration = 30.0,
        max_recoveries: int = 8,
        rng: random.Random | None = None,
        tracing: bool | None = None,
        tracer_provider: Any = None,
        trace_replays: bool = False,
    ) -> None:
        for label, value in (("max_workers", max_workers), ("max_recoveries", max_recoveries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a whole number >= 1, got {value!r}")
        lease_seconds = seconds(lease, "lease")
        if not lease_seconds > 0:
            raise ValueError(f"lease must be a positive duration, got {lease!r}")
        if worker_id is not None and (not isinstance(worker_id, str) or not worker_id):
            raise ValueError(f"worker_id must be a non-empty str, got {worker_id!r}")
        if backend is None or isinstance(backend, (str, Mapping)):
            self.backend = _open_default(backend)
            self._owns_backend = True
        elif isinstance(backend, JournalBackend):
            self.backend = backend
            self._owns_backend = False
        else:
            raise TypeError(
                f"backend must be a runjournal.journal.JournalBackend, a URL or None, "
                f"got {backend!r}"
            )
        self.options = options if options is not None else RunOptions()
        self.codec: Codec = codec if codec is not None else self.options.codec
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.on_retry = on_retry
        self.max_workers = max_workers
        self.max_recoveries = max_recoveries
        self.lease = lease_seconds
        self._explicit_worker_id = worker_id is not None
        self._rng = rng if rng is not None else random.Random()
        if tracing is None:
            tracing = tracing_available()
        self._tracing = Tracing(tracer_provider, replays=trace_replays) if tracing else None
        self._handlers: dict[str, HandlerSpec] = {}
        self._setup(worker_id or default_worker_id())
        _runtimes.add(self)

    def _setup(self, worker_id: str) -> None:
        """Everything that belongs to one process (built again in a forked child)."""
        self.worker_id = worker_id
        self._liveness = Liveness(
            lambda: self.backend, worker_id, self.lease, busy=lambda: bool(self._running)
        )
        # Threads start on first use, so a Runtime without futures has none.
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix="runjournal-future"
        )
        self._recovery_pool: ThreadPoolExecutor | None = None
        self._running: dict[str, threading.Event] = {}
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._recovery_thread: threading.Thread | None = None
        self._recovery_task: asyncio.Task[None] | None = None
        self._writer = JournalWriter(lambda: self.backend, worker_id)
        self._loop: asyncio.AbstractEventLoop | None = None  # runs async handlers for sync callers
        self._loop_thread: threading.Thread | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._warned_blocking = False

    def after_fork(self) -> None:
        """Called in a forked child: this process is a new worker with threads of its own."""
        self._liveness.close()
        worker_id = self.worker_id if self._explicit_worker_id else default_worker_id()
        self._setup(worker_id)

    # -- registration ----------------------------------------------------------

    def handler(self, name: str, *, codec: Codec | None = None) -> Callable[[F], F]:
        """Register a handler ``fn(ctx, input)`` under a stable ``name``.

        The name is journaled with each invocation: keep it stable across
        deploys, or pending invocations cannot be resumed.

        Raises:
            TypeError: ``fn`` cannot be a handler (a generator function, an
                async function, not callable).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a handler name must be a non-empty str, got {name!r}")

        def register(fn: F) -> F:
            _check_handler(name, fn)
            if name in self._handlers and self._handlers[name].fn is not fn:
                raise ValueError(f"a handler named {name!r} is already registered")
            self._handlers[name] = HandlerSpec(
                name, fn, codec or self.codec, is_async=is_async_callable(fn)
            )
            return fn

        return register

    def _spec(self, handler: str | Callable[..., Any]) -> HandlerSpec:
        if isinstance(handler, str):
            spec = self._handlers.get(handler)
        else:
            spec = next((s for s in self._handlers.values() if s.fn is handler), None)
        if spec is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise HandlerNotFound(
                f"no handler {handler!r} is registered on this Runtime (registered: {known}); "
                "decorate it with @runtime.handler(name)"
            )
        return spec

    # -- invocations -------------------------------------------------------------

    def invoke(
        self,
        handler: str | Callable[..., Any],
        input: Any = None,
        *,
        invocation_id: str | None = None,
        timeout: Duration | None = None,
    ) -> Any:
        """Run ``handler`` durably under ``invocation_id`` and return its output.

        A completed invocation returns its journaled output (or re-raises its
        terminal failure) without running the handler; a pending one replays
        and continues. If another live worker (or another thread of this one)
        runs it now, this call waits for its outcome instead of running a
        second copy, and takes it over if that worker's lease expires.

        Args:
            handler: the handler's registered name, or the function.
            input: the handler's input (encoded with its codec).
            invocation_id: the id to journal it under (default: a new uuid4).
            timeout: the longest wait for another worker's outcome (float
                seconds or timedelta); None waits as long as it takes.

        Raises:
            TerminalError: the handler failed terminally (now or before).
            InvocationMismatch: the id was used with another handler or input.
            InvocationTimeout: ``timeout`` passed while another worker ran it.
            Exception: whatever else the handler raised; the invocation stays
                pending for a later ``invoke`` or :meth:`recover`.
        """
        spec = self._spec(handler)
        inv_id, input_bytes, deadline = self._prepare(spec, input, invocation_id, timeout)
        self._warn_if_blocking("invoke")
        if spec.is_async:
            return self._on_loop(self._ainvoke(spec, inv_id, input_bytes, deadline))
        return self._invoke(spec, inv_id, input_bytes, deadline)

    async def ainvoke(
        self,
        handler: str | Callable[..., Any],
        input: Any = None,
        *,
        invocation_id: str | None = None,
        timeout: Duration | None = None,
    ) -> Any:
        """:meth:`invoke` for asyncio code: the event loop never waits on the journal.

        An ``async def`` handler runs on the calling loop (its plain-function
        closures in worker threads); a sync handler runs whole in a worker
        thread. Same arguments, outcome and errors as :meth:`invoke`.
        """
        spec = self._spec(handler)
        if not spec.is_async:
            return await asyncio.to_thread(
                self.invoke, handler, input, invocation_id=invocation_id, timeout=timeout
            )
        inv_id, input_bytes, deadline = self._prepare(spec, input, invocation_id, timeout)
        return await self._ainvoke(spec, inv_id, input_bytes, deadline)

    def _prepare(
        self,
        spec: HandlerSpec,
        input: Any,
        invocation_id: str | None,
        timeout: Duration | None,
    ) -> tuple[str, bytes, float | None]:
        """The id, the encoded input and the deadline of an invoke call."""
        if invocation_id is None:
            inv_id = new_invocation_id()
        else:
            inv_id = invocation_id
            if isinstance(inv_id, str) and inv_id.startswith(WORKER_PREFIX):
                raise ValueError(
                    f"invocation ids starting with {WORKER_PREFIX!r} are reserved for "
                    f"runjournal's worker records; got {inv_id!r}"
                )
        input_bytes = encode_value(spec.codec, input, f"handler {spec.name!r}: the input")
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        return inv_id, input_bytes, deadline

    def _new_record(self, spec: HandlerSpec, inv_id: str, input_bytes: bytes) -> Invocation:
        now = time.time()
        return Invocation(
            id=inv_id,
            handler=spec.name,
            input=input_bytes,
            codec=spec.codec.name,
            created_at=now,
            updated_at=now,
            lease=self._liveness.new_lease(),
        )

    def _warn_if_blocking(self, what: str) -> None:
        if self._warned_blocking or not _loop_running_here():
            return
        self._warned_blocking = True
        emit(
            logging.WARNING,
            "rt.%s() was called from a running event loop: it blocks that loop until the "
            "invocation ends; use `await rt.a%s(...)` in async code",
            what,
            what,
            worker_id=self.worker_id,
        )

    def _invoke(
        self, spec: HandlerSpec, inv_id: str, input_bytes: bytes, deadline: float | None
    ) -> Any:
        while True:
            self._check_open()
            done = self._local_turn(inv_id, deadline)
            if done is None:
                continue  # another thread of this process ran it: look again
            try:
                self._liveness.refresh()
                trust = self._liveness.trust_from_now()
                stored, created = self.backend.create_invocation(
                    self._new_record(spec, inv_id, input_bytes)
                )
                if not created:
                    self._check_same(stored, spec, input_bytes)
                outcome = self._take_and_run(spec, stored, fresh=created, trust=trust)
            finally:
                done.set()
                with self._lock:
                    self._running.pop(inv_id, None)
            if isinstance(outcome, _Done):
                return outcome.value
            self._await_holder(inv_id, outcome, deadline)

    def _local_turn(self, inv_id: str, deadline: float | None) -> threading.Event | None:
        """Mark ``inv_id`` as run by this thread; if another thread of this process
        runs it, wait for that to end and return None."""
        with self._lock:
            running = self._running.get(inv_id)
            if running is None:
                event = self._running[inv_id] = threading.Event()
                return event
        if not running.wait(_remaining(deadline)):
            raise InvocationTimeout(
                f"invocation {inv_id!r} is still running in another thread of this worker"
            )
        return None

    def _take_and_run(
        self, spec: HandlerSpec, stored: Invocation, *, fresh: bool, trust: float
    ) -> _Done | Held:
        """Return a finished invocation's outcome, or take its lease and run it to one.

        ``trust``: until when (monotonic) a lease taken now may be trusted.
        Returns who holds it when another live worker does.
        """
        if stored.status is not InvocationStatus.PENDING:
            return _Done(self._finished(spec, stored))
        if not fresh:
            trust = self._liveness.trust_from_now()
        claimed = stored if fresh else self._claim(stored)
        if isinstance(claimed, Held):
            return claimed
        try:
            return _Done(self._drive(spec, claimed, fresh=fresh, trust=trust))
        except LeaseLost:
            if self._closing.is_set():
                raise
            # Another worker took it over: its outcome is this call's outcome.
            return Held("another worker", time.time())

    def _claim(self, stored: Invocation) -> Invocation | Held:
        """Take the lease of a pending invocation by compare-and-swap, unless another
        live worker holds it (then say who)."""
        me = self._liveness
        for _ in range(16):
            if stored.status is not InvocationStatus.PENDING:
                return stored
            lease = stored.lease
            # A lease of this worker id (an earlier attempt, or an earlier life of
            # this worker) is taken back at once; another worker's only once void.
            if lease is not None and lease.owner != me.worker_id:
                held = None if _idle_here(lease, stored.id) else me.holder(lease)
                if held is not None:
                    return held
            epoch = lease.epoch + 1 if lease is not None else 1
            taken = attrs.evolve(stored, updated_at=time.time(), lease=me.new_lease(epoch))
            try:
                return self.backend.update_invocation(taken)
            except VersionConflict:
                latest = self.backend.get_invocation(stored.id)
                if latest is None:
                    raise LookupError(f"invocation {stored.id!r} was deleted") from None
                stored = latest
        raise LeaseLost(stored.id, "its record kept changing while this worker tried to take it")

    def _await_holder(self, inv_id: str, held: Held, deadline: float | None) -> None:
        """Wait until another worker's invocation finishes or its lease lapses."""
        pause = 0.02
        while True:
            pause = min(pause * 2, _MAX_POLL, self.lease / 4)
            wait = self._look_at_holder(inv_id, held, deadline, pause)
            if wait is None:
                return
            if self._closing.wait(wait):
                self._check_open()

    async def _aawait_holder(self, inv_id: str, held: Held, deadline: float | None) -> None:
        """:meth:`_await_holder` on the loop: a thread only for each look, none parked
        for the whole wait (waiters would starve the loop's default executor)."""
        pause = 0.02
        while True:
            pause = min(pause * 2, _MAX_POLL, self.lease / 4)
            wait = await asyncio.to_thread(self._look_at_holder, inv_id, held, deadline, pause)
            if wait is None:
                return
            await asyncio.sleep(wait)
            self._check_open()

    def _look_at_holder(
        self, inv_id: str, held: Held, deadline: float | None, pause: float
    ) -> float | None:
        """One look at an invocation another worker runs: None once it is finished or
        its lease may have lapsed (or its process died): look again; else how long to
        pause before the next look."""
        stored = self.backend.get_invocation(inv_id)
        if stored is None or stored.status is not InvocationStatus.PENDING:
            return None
        if time.time() >= held.until or process_gone(held.owner):
            return None
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise InvocationTimeout(
                f"invocation {inv_id!r} is still running on worker {held.owner!r}; "
                "it goes on there (invoke again to wait more)"
            )
        return max(pause if remaining is None else min(pause, remaining), 0.0)

    def _check_same(self, stored: Invocation, spec: HandlerSpec, input_bytes: bytes) -> None:
        if stored.handler != spec.name:
            raise InvocationMismatch(
                f"invocation {stored.id!r} belongs to handler {stored.handler!r}, not "
                f"{spec.name!r}; use another invocation id"
            )
        if stored.codec != spec.codec.name or stored.input != input_bytes:
            raise InvocationMismatch(
                f"invocation {stored.id!r} was started with another input; an id stands for "
                "one request: use another invocation id, or resume it with the same input "
                "(or with rt.recover())"
            )

    def _drive(self, spec: HandlerSpec, claimed: Invocation, *, fresh: bool, trust: float) -> Any:
        """Run a pending invocation whose lease this worker holds, to its outcome.

        ``fresh``: the invocation was just created, so no entries are read.
        ``trust``: until when (monotonic) its lease holds without a renewal.
        """
        if spec.is_async:
            return self._on_loop(self._adrive(spec, claimed, fresh=fresh, trust=trust))
        guard = self._guard(claimed, trust)
        recorded = [] if fresh else self.backend.read_entries(claimed.id)
        args, kwargs = self._attempt_args(spec, claimed, recorded, guard)
        attempt = Attempt(*args, **kwargs)
        self._liveness.start()
        try:
            with self._traced(attempt):
                return self._run_attempt(spec, attempt)
        finally:
            attempt.end()

    def _attempt_args(
        self,
        spec: HandlerSpec,
        claimed: Invocation,
        recorded: list[Entry],
        guard: Callable[[], None],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """What every attempt (sync or async) is built with."""
        kwargs = {
            "handler": spec.name,
            "defaults": self.options,
            "clock": self.clock,
            "on_retry": self.on_retry,
            "executor": self._executor,
            "guard": guard,
            "rng": self._rng,
        }
        return (self.backend, claimed, recorded), kwargs

    def _guard(self, claimed: Invocation, trust: float) -> Callable[[], None]:
        """The lease check of an attempt: raises LeaseLost once the lease is gone."""
        assert claimed.lease is not None
        incarnation = claimed.lease.incarnation
        inv_id = claimed.id

        def guard() -> None:
            if self._closing.is_set():
                raise LeaseLost(inv_id, "this Runtime is closing")
            self._liveness.check(incarnation, trust, inv_id)

        return guard

    def _run_attempt(self, spec: HandlerSpec, attempt: Attempt) -> Any:
        inv_id = attempt.invocation_id
        where = f"handler {spec.name!r} (invocation {inv_id!r})"
        input_value = decode_value(
            spec.codec, attempt.record.input, f"{where}: the journaled input"
        )
        # An invocation ends only once every future it started is journaled
        # (or has failed), whatever the handler did: a completed invocation is
        # never replayed, so a side effect still running would be lost.
        try:
            result = spec.fn(Context(attempt), input_value)
        except TerminalError as exc:
            attempt.settle(strict=False)
            done = attempt.complete(InvocationStatus.FAILED, failure=failure_of(exc))
            return self._finished(spec, done, cause=exc)
        except LeaseLost:
            attempt.settle(strict=False)
            if self._closing.is_set():  # still ours: hand it to the other workers now
                self._release(attempt)
            raise
        except Exception:
            attempt.settle(strict=False)
            self._release(attempt)
            raise
        except BaseException:
            attempt.abandon()
            raise
        attempt.settle(strict=True)
        output = encode_value(
            spec.codec, result, f"{where}: the output (the invocation stays pending)"
        )
        done = attempt.complete(InvocationStatus.COMPLETED, output=output)
        return self._finished(spec, done)

    # -- async invocations ---------------------------------------------------------

    async def _ainvoke(
        self, spec: HandlerSpec, inv_id: str, input_bytes: bytes, deadline: float | None
    ) -> Any:
        while True:
            self._check_open()
            done = self._local_turn_nowait(inv_id)
            if not isinstance(done, _Mine):
                # Another thread or task of this worker runs it: wait on the loop (a
                # thread parked per waiter could starve the attempt waited for).
                if not await _await_event(done, deadline):
                    raise InvocationTimeout(
                        f"invocation {inv_id!r} is still running elsewhere in this worker"
                    )
                continue
            try:
                if self._liveness.stale():
                    await asyncio.to_thread(self._liveness.refresh)
                trust = self._liveness.trust_from_now()
                stored, created = await self._writer.write(
                    CreateInvocation(self._new_record(spec, inv_id, input_bytes))
                )
                if not created:
                    self._check_same(stored, spec, input_bytes)
                outcome = await self._atake_and_run(spec, stored, fresh=created, trust=trust)
            finally:
                done.event.set()
                with self._lock:
                    self._running.pop(inv_id, None)
            if isinstance(outcome, _Done):
                return outcome.value
            await self._aawait_holder(inv_id, outcome, deadline)

    def _local_turn_nowait(self, inv_id: str) -> _Mine | threading.Event:
        """Mark ``inv_id`` as run here, or return the event of whoever runs it here."""
        with self._lock:
            running = self._running.get(inv_id)
            if running is not None:
                return running
            event = self._running[inv_id] = threading.Event()
        return _Mine(event)

    async def _atake_and_run(
        self, spec: HandlerSpec, stored: Invocation, *, fresh: bool, trust: float
    ) -> _Done | Held:
        """:meth:`_take_and_run` for an async handler, on the calling loop."""
        if stored.status is not InvocationStatus.PENDING:
            return _Done(self._finished(spec, stored))
        if fresh:
            claimed: Invocation | Held = stored
        else:
            trust = self._liveness.trust_from_now()
            claimed = await asyncio.to_thread(self._claim, stored)
        if isinstance(claimed, Held):
            return claimed
        try:
            return _Done(await self._adrive(spec, claimed, fresh=fresh, trust=trust))
        except LeaseLost:
            if self._closing.is_set():
                raise
            return Held("another worker", time.time())

    async def _adrive(
        self, spec: HandlerSpec, claimed: Invocation, *, fresh: bool, trust: float
    ) -> Any:
        """Run a pending invocation of an async handler, whose lease this worker holds."""
        guard = self._guard(claimed, trust)
        assert claimed.lease is not None
        incarnation = claimed.lease.incarnation

        def aguard() -> Awaitable[None] | None:
            if self._closing.is_set() or not self._liveness.fresh(incarnation, trust):
                return asyncio.to_thread(guard)  # may renew: a write, off the loop
            return None

        recorded = [] if fresh else await asyncio.to_thread(self.backend.read_entries, claimed.id)
        args, kwargs = self._attempt_args(spec, claimed, recorded, guard)
        attempt = AsyncAttempt(*args, **kwargs, writer=self._writer, aguard=aguard)
        self._liveness.start()
        try:
            with self._traced(attempt):
                return await self._arun_attempt(spec, attempt)
        finally:
            attempt.end()

    async def _arun_attempt(self, spec: HandlerSpec, attempt: AsyncAttempt) -> Any:
        inv_id = attempt.invocation_id
        where = f"handler {spec.name!r} (invocation {inv_id!r})"
        input_value = decode_value(
            spec.codec, attempt.record.input, f"{where}: the journaled input"
        )
        try:
            result = await spec.fn(AsyncContext(attempt), input_value)
        except TerminalError as exc:
            await attempt.asettle(strict=False)
            done = await attempt.acomplete(InvocationStatus.FAILED, failure=failure_of(exc))
            return self._finished(spec, done, cause=exc)
        except LeaseLost:
            await attempt.asettle(strict=False)
            if self._closing.is_set():
                await asyncio.to_thread(self._release, attempt)
            raise
        except Exception:
            await attempt.asettle(strict=False)
            await asyncio.to_thread(self._release, attempt)
            raise
        except asyncio.CancelledError:
            # The task was cancelled (a client went away, a shutdown): nothing
            # half-done is journaled, and the invocation is left to arecover().
            attempt.abandon()
            self._release_soon(attempt)
            raise
        except BaseException:
            attempt.abandon()
            raise
        if attempt.interrupted is not None:
            await attempt.asettle(strict=False)
            await asyncio.to_thread(self._release, attempt)
            raise ContextMisuseError(
                f"{where}: the step at index {attempt.interrupted} was cancelled (by "
                "asyncio.timeout, or a cancelled task) and the handler went on; the "
                "invocation stays pending, since a replay would run that step"
            )
        never_awaited = attempt.never_awaited()
        if never_awaited is not None:
            await attempt.asettle(strict=False)
            await asyncio.to_thread(self._release, attempt)
            raise ContextMisuseError(f"{where}: {never_awaited}")
        await attempt.asettle(strict=True)
        output = encode_value(
            spec.codec, result, f"{where}: the output (the invocation stays pending)"
        )
        done = await attempt.acomplete(InvocationStatus.COMPLETED, output=output)
        return self._finished(spec, done)

    def _release_soon(self, attempt: Attempt) -> None:
        """Release the lease from a worker thread (a cancelled task must not wait)."""
        try:
            self._executor.submit(self._release, attempt)
        except RuntimeError:  # the executor is shut down: release right here
            self._release(attempt)

    def _on_loop(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Run ``work`` on this Runtime's own event loop (a thread started on first use)
        and wait for it: how sync callers run async handlers."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name=f"runjournal-loop-{self.worker_id}", daemon=True
                )
                thread.start()
                self._loop, self._loop_thread = loop, thread
            loop = self._loop
        if threading.current_thread() is self._loop_thread:
            work.close()
            raise RuntimeError(
                "a sync Runtime call was made from this Runtime's own event loop; use the "
                "async form (ainvoke, arecover)"
            )
        return asyncio.run_coroutine_threadsafe(work, loop).result()

    @contextlib.contextmanager
    def _traced(self, attempt: Attempt) -> Iterator[None]:
        """An invocation attempt, in its span when this Runtime traces."""
        if self._tracing is None or not self._tracing.active():
            yield
            return
        resumed = attempt.is_replaying() or attempt.record.version > 1
        with self._tracing.invocation(
            attempt.invocation_id, attempt.handler, self.worker_id, resumed=resumed
        ) as tracing:
            attempt.tracing = tracing
            try:
                yield
            finally:
                attempt.tracing = None

    def _release(self, attempt: Attempt) -> None:
        """Give up the lease of an invocation left pending, so any worker may resume it."""
        record = attempt.record
        if record.lease is None:
            return
        released = attrs.evolve(record.lease, incarnation=RELEASED, expires_at=0.0)
        try:
            self.backend.update_invocation(
                attrs.evolve(record, updated_at=time.time(), lease=released)
            )
        except Exception as exc:  # the lease lapses by itself anyway
            emit(
                logging.INFO,
                "invocation %r: could not release its lease: %s",
                record.id,
                exc,
                invocation_id=record.id,
                handler=record.handler,
                worker_id=self.worker_id,
            )

    def _finished(
        self, spec: HandlerSpec, inv: Invocation, cause: BaseException | None = None
    ) -> Any:
        if inv.status is InvocationStatus.FAILED:
            assert inv.failure is not None
            raise terminal_from(inv.failure) from cause
        assert inv.output is not None
        return decode_value(
            spec.codec, inv.output, f"handler {spec.name!r} (invocation {inv.id!r}): the output"
        )

    def resume(self, invocation_id: str, *, timeout: Duration | None = None) -> Any:
        """Continue a journaled invocation with its journaled input (see :meth:`invoke`)."""
        stored = self.backend.get_invocation(invocation_id)
        if stored is None:
            raise LookupError(f"no invocation {invocation_id!r} in this journal")
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        return self._invoke(self._spec(stored.handler), stored.id, stored.input, deadline)

    # -- recovery ------------------------------------------------------------------

    def recover(self, *, timeout: Duration | None = None) -> list[RecoveryResult]:
        """Resume the pending invocations no live worker holds, concurrently.

        Takes only invocations whose lease has expired (or that this worker
        id holds), whose handler is registered here; each runs with its
        journaled input on this Runtime's recovery threads
        (``max_recoveries`` at once), and a failure of one does not stop the
        others.

        Args:
            timeout: the longest wait for them to finish; those still running
                then go on in the background (reported ``running=True``).
                None waits for all: a service starting up should pass a
                timeout (or 0), or use :meth:`start_recovery`, so one stuck
                invocation does not hold up its start.

        Returns:
            One result per pending invocation of a handler registered here,
            in id order: run here (completed, failed, still pending with the
            error, or running), or skipped and why (a live worker holds it,
            it already runs in this process). Invocations of handlers not
            registered here belong to other services and are left out.
        """
        self._check_open()
        limit = None if timeout is None else seconds(timeout, "timeout")
        results: dict[str, RecoveryResult] = {}
        started: dict[concurrent.futures.Future[RecoveryResult], Invocation] = {}
        for stored, skipped in self._orphans():
            if skipped is not None:
                results[stored.id] = _skipped(stored, skipped)
            else:
                started[self._submit_recovery(stored)] = stored
        done, _ = concurrent.futures.wait(started, timeout=limit)
        return _gathered(results, started, done)

    def start_recovery(self, interval: Duration | None = None) -> None:
        """Keep taking over orphaned invocations in the background, until :meth:`close`.

        Every ``interval`` (default: a third of the lease) it looks for pending
        invocations whose owner's lease expired and runs them, as
        :meth:`recover` does, without waiting for them. Called from a running
        event loop, it is a task of that loop (async handlers run on it, as
        with :meth:`arecover`); otherwise a thread. Calling it again changes
        nothing.
        """
        self._check_open()
        every = self.lease / 3 if interval is None else seconds(interval, "interval")
        if not every > 0:
            raise ValueError(f"interval must be a positive duration, got {interval!r}")
        if _loop_running_here():
            # In an asyncio service: a task of this loop, so async handlers run on it.
            with self._lock:
                if self._recovery_task is not None or self._recovery_thread is not None:
                    return
                self._recovery_task = asyncio.get_running_loop().create_task(
                    self._arecovery_loop(every)
                )
            return
        with self._lock:
            if self._recovery_thread is not None or self._recovery_task is not None:
                return
            thread = threading.Thread(
                target=self._recovery_loop,
                args=(every,),
                name=f"runjournal-recovery-{self.worker_id}",
                daemon=True,
            )
            self._recovery_thread = thread
        thread.start()

    def _recovery_loop(self, every: float) -> None:
        while not self._closing.is_set():
            try:
                for stored, skipped in self._orphans():
                    if skipped is None:
                        self._submit_recovery(stored)
            except Exception:  # the loop must outlive a journal hiccup
                emit(
                    logging.ERROR,
                    "recovery pass of worker %r failed",
                    self.worker_id,
                    worker_id=self.worker_id,
                    exc_info=True,
                )
            self._closing.wait(every)

    def _orphans(self) -> list[tuple[Invocation, str | None]]:
        """Pending invocations of handlers registered here, each with why it must be
        skipped (None: take it)."""
        found = []
        now = time.time()
        for inv_id in list(self.backend.list_invocations(InvocationStatus.PENDING)):
            stored = self.backend.get_invocation(inv_id)
            if stored is None or stored.status is not InvocationStatus.PENDING:
                continue
            if stored.handler not in self._handlers:
                emit(
                    logging.DEBUG,
                    "recover: leaving invocation %r alone: handler %r is not registered here",
                    inv_id,
                    stored.handler,
                    invocation_id=inv_id,
                    handler=stored.handler,
                    worker_id=self.worker_id,
                )
                continue
            found.append((stored, self._why_skip(stored, now)))
        return found

    def _why_skip(self, stored: Invocation, now: float) -> str | None:
        with self._lock:
            if stored.id in self._running or stored.id in self._queued:
                return "it is already running in this worker"
        lease = stored.lease
        if (
            lease is not None
            and lease.owner != self.worker_id
            and now < lease.expires_at
            and lease.incarnation != RELEASED
            and not _idle_here(lease, stored.id)
            and not process_gone(lease.owner)
        ):
            return f"worker {lease.owner!r} holds it (lease until {_when(lease.expires_at)})"
        return None

    def _submit_recovery(self, stored: Invocation) -> concurrent.futures.Future[RecoveryResult]:
        with self._lock:
            if self._recovery_pool is None:
                self._recovery_pool = ThreadPoolExecutor(
                    max_workers=self.max_recoveries, thread_name_prefix="runjournal-recovery"
                )
            self._queued.add(stored.id)
            pool = self._recovery_pool
        return pool.submit(self._recover_one, stored)

    def _recover_one(self, stored: Invocation) -> RecoveryResult:
        inv_id = stored.id
        with self._lock:
            self._queued.discard(inv_id)
            if inv_id in self._running:
                return _skipped(stored, "it is already running in this worker")
            done = self._running[inv_id] = threading.Event()
        try:
            self._liveness.refresh()
            latest = self.backend.get_invocation(inv_id)
            if latest is None:
                return _skipped(stored, "it was deleted")
            outcome = self._take_and_run(
                self._handlers[stored.handler], latest, fresh=False, trust=float("-inf")
            )
        except Exception as exc:
            return _recovery_error(stored, exc)
        finally:
            done.set()
            with self._lock:
                self._running.pop(inv_id, None)
        return _recovery_done(stored, outcome)

    async def _arecover_one(self, stored: Invocation, gate: asyncio.Semaphore) -> RecoveryResult:
        """:meth:`_recover_one` on the calling loop (a sync handler's in a worker thread)."""
        async with gate:
            spec = self._handlers[stored.handler]
            if not spec.is_async:
                return await asyncio.to_thread(self._recover_one, stored)
            inv_id = stored.id
            with self._lock:
                self._queued.discard(inv_id)
                if inv_id in self._running:
                    return _skipped(stored, "it is already running in this worker")
                done = self._running[inv_id] = threading.Event()
            try:
                if self._liveness.stale():
                    await asyncio.to_thread(self._liveness.refresh)
                latest = await asyncio.to_thread(self.backend.get_invocation, inv_id)
                if latest is None:
                    return _skipped(stored, "it was deleted")
                outcome = await self._atake_and_run(spec, latest, fresh=False, trust=float("-inf"))
            except Exception as exc:
                return _recovery_error(stored, exc)
            finally:
                done.set()
                with self._lock:
                    self._running.pop(inv_id, None)
            return _recovery_done(stored, outcome)

    async def arecover(self, *, timeout: Duration | None = None) -> list[RecoveryResult]:
        """:meth:`recover` for asyncio code: async handlers run as tasks on the calling
        loop (``max_recoveries`` at once), sync ones in worker threads; the loop never
        waits on the journal. Same results as :meth:`recover`; those still running
        when ``timeout`` passes go on as tasks of this loop."""
        self._check_open()
        limit = None if timeout is None else seconds(timeout, "timeout")
        gate = asyncio.Semaphore(self.max_recoveries)
        results: dict[str, RecoveryResult] = {}
        started: dict[asyncio.Task[RecoveryResult], Invocation] = {}
        for stored, skipped in await asyncio.to_thread(self._orphans):
            if skipped is not None:
                results[stored.id] = _skipped(stored, skipped)
            else:
                started[self._spawn_recovery(stored, gate)] = stored
        done: set[asyncio.Task[RecoveryResult]] = set()
        if started:
            done, _ = await asyncio.wait(started, timeout=limit)
        return _gathered(results, started, done)

    def _spawn_recovery(
        self, stored: Invocation, gate: asyncio.Semaphore
    ) -> asyncio.Task[RecoveryResult]:
        with self._lock:
            self._queued.add(stored.id)
        task = asyncio.get_running_loop().create_task(self._arecover_one(stored, gate))
        self._background.add(task)  # kept alive until it ends
        task.add_done_callback(self._background.discard)
        return task

    async def _arecovery_loop(self, every: float) -> None:
        gate = asyncio.Semaphore(self.max_recoveries)
        while not self._closing.is_set():
            try:
                for stored, skipped in await asyncio.to_thread(self._orphans):
                    if skipped is None:
                        self._spawn_recovery(stored, gate)
            except Exception:  # the loop must outlive a journal hiccup
                emit(
                    logging.ERROR,
                    "recovery pass of worker %r failed",
                    self.worker_id,
                    worker_id=self.worker_id,
                    exc_info=True,
                )
            await asyncio.sleep(every)

    # -- looking -------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        """This worker's current incarnation: leases it takes now carry it."""
        return self._liveness.incarnation

    def runs(self, invocation_id: str) -> bool:
        """Whether this Runtime is running (or about to run) that invocation now."""
        with self._lock:
            return invocation_id in self._running or invocation_id in self._queued

    def status(self, invocation_id: str) -> InvocationStatus | None:
        """The stored status of an invocation, or None if there is none."""
        stored = self.backend.get_invocation(invocation_id)
        return None if stored is None else stored.status

    # -- retention -----------------------------------------------------------------

    def purge(
        self,
        older_than: Duration,
        statuses: Statuses = FINISHED,
        include_pending: bool = False,
        dry_run: bool = False,
        progress: Callable[[PurgeStep], None] | None = None,
    ) -> int:
        """Remove invocations (with their entries) finished longer than ``older_than`` ago.

        Pending invocations only with ``include_pending=True`` (and never one a
        live worker holds); see :func:`runjournal.context.purge` for the rules.

        Returns:
            How many were removed (in a dry run: would be).
        """
        self._check_open()
        return purge(
            self.backend,
            older_than=older_than,
            statuses=statuses,
            include_pending=include_pending,
            dry_run=dry_run,
            progress=progress,
        )

    # -- lifecycle --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise RuntimeError("this Runtime is closed")

    def close(self) -> None:
        """Stop taking work and end this worker's leases, so others can take over at once.

        Running attempts stop at their next ctx operation (:class:`LeaseLost`);
        running closures and futures are waited for. Closes the backend if
        this Runtime opened it. Idempotent.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        thread = self._recovery_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        task = self._recovery_task
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)
        with self._lock:
            pool = self._recovery_pool
        if pool is not None:
            pool.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        loop, loop_thread = self._loop, self._loop_thread
        if loop is not None and loop_thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join()
            loop.close()
        self._writer.close()
        self._liveness.release()
        if self._owns_backend:
            self.backend.close()

    async def aclose(self) -> None:
        """:meth:`close` for asyncio code: waits in a worker thread, not on the loop.

        Recoveries this loop runs in the background (``start_recovery``,
        ``arecover`` past its timeout) are cancelled first: their invocations
        stay pending, journaled up to the step that was running, for the next
        worker.
        """
        loop = asyncio.get_running_loop()
        mine = [t for t in (self._recovery_task, *self._background) if t is not None]
        mine = [t for t in mine if t.get_loop() is loop and not t.done()]
        for task in mine:
            task.cancel()
        if mine:
            await asyncio.gather(*mine, return_exceptions=True)
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _idle_here(lease: Lease, invocation_id: str) -> bool:
    """Whether ``lease`` was taken by a Runtime of this process that is not running the
    invocation (its attempt ended without releasing it: a simulated crash, say)."""
    return any(
        rt.worker_id == lease.owner
        and rt.incarnation == lease.incarnation
        and not rt.runs(invocation_id)
        for rt in list(_runtimes)
    )


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def _await_event(event: threading.Event, deadline: float | None) -> bool:
    """Wait for ``event`` without a thread: look every few milliseconds, up to
    ``_LOCAL_POLL``. False if ``deadline`` (monotonic) passed first."""
    pause = 0.001
    while not event.is_set():
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            return False
        pause = min(pause * 2, _LOCAL_POLL)
        await asyncio.sleep(pause if remaining is None else min(pause, remaining))
    return True


def _when(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _gathered(
    results: dict[str, RecoveryResult],
    started: Mapping[Any, Invocation],
    done: Collection[Any],
) -> list[RecoveryResult]:
    """``results`` with those of the recoveries ``started`` (futures or tasks): their own
    if ``done``, else still running. In id order."""
    for future, stored in started.items():
        if future in done:
            results[stored.id] = future.result()
        else:
            results[stored.id] = RecoveryResult(
                stored.id, stored.handler, InvocationStatus.PENDING, running=True
            )
    return [results[i] for i in sorted(results)]


def _recovery_error(stored: Invocation, exc: Exception) -> RecoveryResult:
    if isinstance(exc, TerminalError):
        return RecoveryResult(stored.id, stored.handler, InvocationStatus.FAILED, error=exc)
    emit(
        logging.WARNING,
        "recover: invocation %r is still pending: %s: %s",
        stored.id,
        type(exc).__name__,
        exc,
        invocation_id=stored.id,
        handler=stored.handler,
    )
    return RecoveryResult(stored.id, stored.handler, InvocationStatus.PENDING, error=exc)


def _recovery_done(stored: Invocation, outcome: _Done | Held) -> RecoveryResult:
    if isinstance(outcome, Held):
        return _skipped(stored, f"worker {outcome.owner!r} holds it")
    return RecoveryResult(stored.id, stored.handler, InvocationStatus.COMPLETED, outcome.value)


def _skipped(stored: Invocation, why: str) -> RecoveryResult:
    return RecoveryResult(stored.id, stored.handler, InvocationStatus.PENDING, skipped=why)


def _check_handler(name: str, fn: object) -> None:
    """Refuse at registration what cannot run as a handler, saying why."""
    if not callable(fn):
        raise TypeError(
            f"handler {name!r} must be a function fn(ctx, input), got {type(fn).__name__} {fn!r}"
        )
    target = inspect.unwrap(fn)
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"handler {name!r} is a generator function; a handler returns its output once "
            "(its return value is journaled), so return a value instead of yielding"
        )
