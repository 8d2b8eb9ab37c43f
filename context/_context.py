"""The handler's view of a durable invocation: ``ctx.run`` and friends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from context._cursor import ReplayCursor
from context._errors import ContextMisuseError, failure_of, terminal_from
from context._options import RunOptions, resolve_options
from context._retry import Clock, Failed, RetryHook, Succeeded, call_with_retry
from journal import CodecError, Entry, EntryKind

if TYPE_CHECKING:
    from journal import Codec

__all__ = ["Context"]

T = TypeVar("T")

_local = threading.local()


def _active() -> list[Context]:
    stack: list[Context] | None = getattr(_local, "closures", None)
    if stack is None:
        stack = _local.closures = []
    return stack


@contextmanager
def inside_closure(ctx: Context) -> Iterator[None]:
    """Mark this thread as running one of ``ctx``'s closures."""
    stack = _active()
    stack.append(ctx)
    try:
        yield
    finally:
        stack.pop()


class Context:
    """Durable operations for one invocation attempt. Handed to handlers; not built by users."""

    def __init__(
        self,
        cursor: ReplayCursor,
        *,
        handler: str,
        defaults: RunOptions,
        clock: Clock,
        on_retry: RetryHook | None = None,
    ) -> None:
        self._cursor = cursor
        self._handler = handler
        self._defaults = defaults
        self._clock = clock
        self._on_retry = on_retry
        limit = cursor.backend.capabilities.max_payload_bytes
        self._max_payload = limit

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

    # -- pieces shared with futures ------------------------------------------

    def _check_usable(self, operation: str) -> None:
        if self in _active():
            raise ContextMisuseError(
                f"ctx.{operation}() was called inside a run closure of invocation "
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
            with inside_closure(self):
                return fn()

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
        where = self._where(entry.index, entry.name)
        if entry.codec != codec.name:
            raise CodecError(
                f"{where}: journaled with codec {entry.codec!r}, but the code now asks for "
                f"{codec.name!r}; keep the codec a step was recorded with"
            )
        if entry.payload is None:
            raise CodecError(f"{where}: the journaled entry has no payload")
        try:
            return codec.decode(entry.payload)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from exc
        except Exception as exc:
            raise CodecError(
                f"{where}: codec {codec.name!r} failed to decode {len(entry.payload)} bytes: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _where(self, index: int, name: str | None) -> str:
        label = repr(name) if name is not None else "<unnamed>"
        return f"run {label} (invocation {self.invocation_id!r}, index {index})"

    def __repr__(self) -> str:
        return f"<Context invocation={self.invocation_id!r} handler={self._handler!r}>"
