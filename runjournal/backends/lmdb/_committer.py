"""The group committer: writes from all threads of a process share commits.

Whoever finds no commit under way leads: it takes every queued write into
one write transaction, so many writes share one sync, while each caller
returns only after its own write is committed. Each waiting writer is woken
exactly once: when its write is done, or when it is handed the lead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import lmdb

from runjournal.backends.lmdb._errors import translate
from runjournal.backends.lmdb._gate import ResizeGate
from runjournal.journal import JournalError, TransientError

__all__ = ["GroupCommitter", "Op", "TransactionSource"]


class TransactionSource(Protocol):
    """Where write transactions come from: an ``lmdb.Environment``, or a fake.

    ``begin(write=True)`` returns a transaction with ``commit()`` and
    ``abort()``; it is handed to each op's function as it is.
    """

    def begin(self, *, write: bool) -> Any: ...


class Op:
    """One queued write: ``fn`` runs inside the batch's write transaction.

    ``fn`` may raise a :class:`JournalError` to refuse the write; it must then
    have written nothing, since the others of its batch are committed.
    ``wake`` is held from birth; the committer releases it once the op is
    done, or once it hands the op's thread the lead (``lead``), so each
    waiting writer is woken exactly once.
    """

    __slots__ = ("error", "fn", "lead", "result", "wake")

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.lead = False
        self.wake = threading.Lock()
        self.wake.acquire()


class GroupCommitter:
    """Runs each write in a committed write transaction, shared when writers wait.

    Args:
        source: where write transactions come from.
        gate: entered around each transaction, so a map resize waits for it.
        path: the journal, named in error messages.
        grouped: let waiting writers share a transaction; if false, every
            write commits alone.
        grow: called when the map is full; the batch is then retried.
        adopt: called when another process grew the map; the batch is then
            retried.
    """

    def __init__(
        self,
        source: TransactionSource,
        gate: ResizeGate,
        *,
        path: str,
        grouped: bool,
        grow: Callable[[], None],
        adopt: Callable[[], None],
    ) -> None:
        self._source = source
        self._gate = gate
        self._path = path
        self._grouped = grouped
        self._grow = grow
        self._adopt = adopt
        self._mutex = threading.Lock()
        self._queue: list[Op] = []
        self._leading = False

    @property
    def queued(self) -> int:
        """How many writes wait for the next batch (a snapshot)."""
        return len(self._queue)

    def write(self, op: Op) -> Any:
        """Run ``op`` in a committed (and, if durable, synced) write transaction.

        With group commit, the first writer to find no commit under way leads:
        it commits everything queued so far in one transaction, wakes each
        writer whose op it committed, and hands the lead to the first writer
        that queued meanwhile.

        Returns:
            What ``op.fn`` returned.

        Raises:
            JournalError: what ``op.fn`` raised, or what a failed commit
                stands for (lmdb's error translated, as its cause).
        """
        if not self._grouped:
            self._commit([op])
        else:
            with self._mutex:
                self._queue.append(op)
                lead = not self._leading
                self._leading = True
            if not lead:
                op.wake.acquire()
                lead = op.lead
            if lead:
                self._lead()
        if op.error is not None:
            raise op.error
        return op.result

    def write_many(self, ops: list[Op]) -> None:
        """Run ``ops`` in one committed write transaction (with whatever else is queued).

        Each op's ``result`` or ``error`` is set; nothing is raised for a
        refused op. The ops are queued together, so one batch takes them all:
        the caller waits for the first of them only.
        """
        if not ops:
            return
        if not self._grouped:
            self._commit(ops)
            return
        with self._mutex:
            self._queue.extend(ops)
            lead = not self._leading
            self._leading = True
        first = ops[0]
        if not lead:
            first.wake.acquire()
            lead = first.lead
        if lead:
            self._lead()

    def _lead(self) -> None:
        with self._mutex:
            batch, self._queue = self._queue, []
        try:
            self._commit(batch)
        finally:
            with self._mutex:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._leading = False
                else:
                    successor.lead = True
            # The next leader first: it is then first in line for the GIL, and
            # the next commit does not wait behind every writer just woken.
            if successor is not None:
                successor.wake.release()
            for op in batch:
                op.wake.release()

    def _commit(self, batch: list[Op]) -> None:
        try:
            while True:
                try:
                    self._commit_once(batch)
                    return
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self._adopt()
        except Exception as exc:
            error = exc
            if isinstance(exc, lmdb.Error):
                error = translate(self._path, exc)
                error.__cause__ = exc
            for op in batch:
                op.error, op.result = error, None
        except BaseException:
            # KeyboardInterrupt or the like in the committing thread: nothing
            # was committed; the other writers must not wait forever.
            for op in batch:
                op.error = TransientError(f"LMDB journal {self._path}: commit interrupted")
            raise

    def _commit_once(self, batch: list[Op]) -> None:
        self._gate.enter()
        try:
            txn = self._source.begin(write=True)
            try:
                for op in batch:
                    try:
                        op.result, op.error = op.fn(txn), None
                    except JournalError as exc:
                        # Ops check before they write, so a refused op wrote nothing.
                        op.result, op.error = None, exc
                txn.commit()
            except BaseException:
                txn.abort()
                raise
        finally:
            self._gate.exit()
