"""The Runtime: registers handlers, runs invocations, resumes unfinished ones."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import attrs

from runjournal.context._attempt import Attempt
from runjournal.context._context import Context
from runjournal.context._errors import (
    HandlerNotFound,
    InvocationMismatch,
    TerminalError,
    failure_of,
    terminal_from,
)
from runjournal.context._options import RunOptions
from runjournal.context._retry import Clock, RetryHook, SystemClock
from runjournal.journal import (
    Codec,
    Invocation,
    InvocationStatus,
    JournalBackend,
    VersionConflict,
    decode_value,
    encode_value,
)

__all__ = ["HandlerSpec", "RecoveryResult", "Runtime"]

log = logging.getLogger("runjournal")

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Context, Any], Any]


@attrs.frozen
class HandlerSpec:
    """A registered handler: its stable name, function and input/output codec."""

    name: str
    fn: Handler
    codec: Codec


@attrs.frozen
class RecoveryResult:
    """What :meth:`Runtime.recover` did with one pending invocation.

    ``status`` is the invocation's status afterwards; ``error`` is what the
    attempt raised (a terminal failure, or why it is still pending).
    """

    invocation_id: str
    handler: str
    status: InvocationStatus
    output: Any = None
    error: BaseException | None = None


class _IdSource:
    """Random (version 4) UUIDs from the OS's secure randomness, read in batches.

    ``uuid.uuid4()`` reads ``os.urandom`` once per id, a system call that
    releases the GIL; with many threads invoking, each release can cost a
    thread switch. Reading 256 ids' worth at once keeps them exactly as
    unpredictable (they are meant as idempotency keys) at a fraction of the
    calls. A forked child drops the parent's unread bytes, so the two never
    hand out the same id.
    """

    BATCH = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer, self._pos = b"", 0

    def new(self) -> str:
        with self._lock:
            if self._pos >= len(self._buffer):
                self._buffer, self._pos = os.urandom(16 * self.BATCH), 0
            chunk = self._buffer[self._pos : self._pos + 16]
            self._pos += 16
        return uuid.UUID(bytes=chunk, version=4).hex


_ids = _IdSource()


def new_invocation_id() -> str:
    """A random (version 4) UUID in hex, for invocations the caller did not name."""
    return _ids.new()


def _open_default(url: str | Mapping[str, Any] | None) -> JournalBackend:
    # The engine is chosen at the edge: `backends` is looked up when a Runtime
    # is built without a ready backend, so `context` never imports an engine.
    backends = importlib.import_module("runjournal.backends")
    backend: JournalBackend = backends.open_backend(url)
    return backend


class Runtime:
    """Runs durable handlers against one journal.

    Args:
        backend: a ready :class:`runjournal.journal.JournalBackend`; or a URL / config
            mapping for ``runjournal.backends.open_backend``; or None for
            ``$RUNJOURNAL_URL``, else ``lmdb://.runjournal``. A backend the
            Runtime opened itself is closed by :meth:`close`.
        codec: the default codec of handler inputs and outputs (JSON).
        options: the default :class:`RunOptions` of every run.
        clock: where retries read time and sleep (tests pass a fake one).
        on_retry: called with a :class:`RetryDetails` after each failed attempt.
        max_workers: how many ``ctx.run_async`` closures run at once, over
            all invocations of this Runtime (8); more wait their turn.
            :meth:`close` waits for the running ones.
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
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a whole number >= 1, got {max_workers!r}")
        if backend is None or isinstance(backend, (str, Mapping)):
            self.backend = _open_default(backend)
            self._owns_backend = True
        elif isinstance(backend, JournalBackend):
            self.backend = backend
            self._owns_backend = False
        else:
            raise TypeError(
                f"backend must be a journal.JournalBackend, a URL or None, got {backend!r}"
            )
        self.options = options if options is not None else RunOptions()
        self.codec: Codec = codec if codec is not None else self.options.codec
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.on_retry = on_retry
        self._handlers: dict[str, HandlerSpec] = {}
        self.max_workers = max_workers
        # Threads start on first use, so a Runtime without futures has none.
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="runjournal-future"
        )

    # -- registration ----------------------------------------------------------

    def handler(self, name: str, *, codec: Codec | None = None) -> Callable[[F], F]:
        """Register a handler ``fn(ctx, input)`` under a stable ``name``.

        The name is journaled with each invocation: keep it stable across
        deploys, or pending invocations cannot be resumed.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a handler name must be a non-empty str, got {name!r}")

        def register(fn: F) -> F:
            _check_handler(name, fn)
            if name in self._handlers and self._handlers[name].fn is not fn:
                raise ValueError(f"a handler named {name!r} is already registered")
            self._handlers[name] = HandlerSpec(name, fn, codec or self.codec)
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
    ) -> Any:
        """Run ``handler`` durably under ``invocation_id`` and return its output.

        A completed invocation returns its journaled output (or re-raises its
        terminal failure) without running the handler; a pending one replays
        and continues.

        Raises:
            TerminalError: the handler failed terminally (now or before).
            InvocationMismatch: the id was used with another handler or input.
            EntryConflict: another worker is running this invocation.
            Exception: whatever else the handler raised; the invocation stays
                pending for a later ``invoke`` or :meth:`recover`.
        """
        spec = self._spec(handler)
        inv_id = invocation_id if invocation_id is not None else new_invocation_id()
        input_bytes = encode_value(spec.codec, input, f"handler {spec.name!r}: the input")
        now = time.time()
        stored, created = self.backend.create_invocation(
            Invocation(
                id=inv_id,
                handler=spec.name,
                input=input_bytes,
                codec=spec.codec.name,
                created_at=now,
                updated_at=now,
            )
        )
        if not created:
            self._check_same(stored, spec, input_bytes)
        # Nothing can be journaled yet for an invocation this call created.
        return self._drive(spec, stored, fresh=created)

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

    def _drive(self, spec: HandlerSpec, stored: Invocation, *, fresh: bool = False) -> Any:
        """Return a finished invocation's outcome, or run it to one.

        ``fresh``: the invocation was just created, so no entries are read.
        """
        if stored.status is not InvocationStatus.PENDING:
            return self._finished(spec, stored)
        recorded = [] if fresh else self.backend.read_entries(stored.id)
        attempt = Attempt(
            self.backend,
            stored.id,
            recorded,
            handler=spec.name,
            defaults=self.options,
            clock=self.clock,
            on_retry=self.on_retry,
            executor=self._executor,
        )
        try:
            return self._run_attempt(spec, stored, attempt)
        finally:
            attempt.end()

    def _run_attempt(self, spec: HandlerSpec, stored: Invocation, attempt: Attempt) -> Any:
        where = f"handler {spec.name!r} (invocation {stored.id!r})"
        input_value = decode_value(spec.codec, stored.input, f"{where}: the journaled input")
        # An invocation ends only once every future it started is journaled
        # (or has failed), whatever the handler did: a completed invocation is
        # never replayed, so a side effect still running would be lost.
        try:
            result = spec.fn(Context(attempt), input_value)
        except TerminalError as exc:
            attempt.settle(strict=False)
            done = self._complete(stored, status=InvocationStatus.FAILED, failure=failure_of(exc))
            return self._finished(spec, done, cause=exc)
        except Exception:
            attempt.settle(strict=False)
            raise
        except BaseException:
            attempt.abandon()
            raise
        attempt.settle(strict=True)
        output = encode_value(
            spec.codec, result, f"{where}: the output (the invocation stays pending)"
        )
        done = self._complete(stored, status=InvocationStatus.COMPLETED, output=output)
        return self._finished(spec, done)

    def _complete(self, stored: Invocation, **outcome: Any) -> Invocation:
        """Record the outcome with compare-and-swap; the first finisher wins."""
        current = stored
        while True:
            try:
                return self.backend.update_invocation(
                    attrs.evolve(current, updated_at=time.time(), **outcome)
                )
            except VersionConflict:
                latest = self.backend.get_invocation(stored.id)
                if latest is None or latest.status is not InvocationStatus.PENDING:
                    return latest or current
                current = latest

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

    def resume(self, invocation_id: str) -> Any:
        """Continue a journaled invocation with its journaled input."""
        stored = self.backend.get_invocation(invocation_id)
        if stored is None:
            raise LookupError(f"no invocation {invocation_id!r} in this journal")
        return self._drive(self._spec(stored.handler), stored)

    def recover(self) -> list[RecoveryResult]:
        """Resume every pending invocation whose handler is registered here.

        Each is resumed with its journaled input; a failure of one does not
        stop the others. Invocations of handlers not registered on this
        Runtime are left alone (another service may own them).
        """
        results = []
        for inv_id in list(self.backend.list_invocations(InvocationStatus.PENDING)):
            stored = self.backend.get_invocation(inv_id)
            if stored is None or stored.status is not InvocationStatus.PENDING:
                continue
            if stored.handler not in self._handlers:
                log.info("recover: skipping %r of unknown handler %r", inv_id, stored.handler)
                continue
            try:
                output = self._drive(self._handlers[stored.handler], stored)
            except TerminalError as exc:
                results.append(
                    RecoveryResult(inv_id, stored.handler, InvocationStatus.FAILED, error=exc)
                )
            except Exception as exc:
                log.warning("recover: %r is still pending: %s: %s", inv_id, type(exc).__name__, exc)
                results.append(
                    RecoveryResult(inv_id, stored.handler, InvocationStatus.PENDING, error=exc)
                )
            else:
                results.append(
                    RecoveryResult(inv_id, stored.handler, InvocationStatus.COMPLETED, output)
                )
        return results

    def status(self, invocation_id: str) -> InvocationStatus | None:
        """The stored status of an invocation, or None if there is none."""
        stored = self.backend.get_invocation(invocation_id)
        return None if stored is None else stored.status

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        """Wait for running futures, stop the executor, and close the backend if
        this Runtime opened it."""
        self._executor.shutdown(wait=True)
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    if inspect.iscoroutinefunction(target):
        raise TypeError(
            f"handler {name!r} is an async def function; this version of runjournal runs "
            "sync handlers only. Make it a plain def (run async code inside a step with "
            "asyncio.run), or wait for async handler support"
        )
