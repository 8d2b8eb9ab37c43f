"""The handler's view of a durable invocation: ``ctx.run`` and friends.

A :class:`Context` is a front door onto one invocation attempt
(the ``Attempt`` the Runtime drives): it holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from runjournal.context._attempt import Attempt
from runjournal.context._futures import RunFuture
from runjournal.context._options import RunOptions

__all__ = ["Context"]

T = TypeVar("T")


class Context:
    """Durable operations for one invocation attempt. Handed to handlers; not built by users.

    A Context is valid only while its handler runs, and only in the thread
    running the handler: outside that, and inside run closures, every
    operation raises :class:`ContextMisuseError`.
    """

    def __init__(self, attempt: Attempt) -> None:
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
        return self._attempt.run(fn, name, options, option_kwargs)  # type: ignore[no-any-return]

    def run_void(
        self,
        fn: Callable[[], object],
        *,
        name: str | None = None,
        options: RunOptions | None = None,
        **option_kwargs: Any,
    ) -> None:
        """Like :meth:`run` for a side effect whose return value is not kept."""

        def call() -> None:
            fn()

        self._attempt.check_usable("ctx.run_void()")
        self._attempt.run(call, name, options, option_kwargs)

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
        return self._attempt.run_async(fn, name, options, option_kwargs)

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
        return self._attempt.wait_first(futs)

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
        return self._attempt.wait(futs)

    def __repr__(self) -> str:
        return (
            f"<Context invocation={self._attempt.invocation_id!r} "
            f"handler={self._attempt.handler!r}>"
        )
