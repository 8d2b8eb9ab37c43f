"""The journal writer of async invocations: writes leave the event loop in batches.

The engine protocol is synchronous, so an event loop must never call it. Async
invocations hand their writes to one writer thread per Runtime instead. It
takes everything queued since its last batch, makes it durable with one
``write_batch`` (one commit on LMDB; parallel requests on S3; one call per
write on an engine without it), and wakes each waiting loop once per batch
with every result of that loop. Many concurrent invocations thus share one
commit and one loop wake-up, and no write costs a thread hand-off of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from runjournal.context._log import emit
from runjournal.journal import (
    BackendUnavailable,
    BatchWriter,
    JournalBackend,
    Write,
    write_each,
)

__all__ = ["JournalWriter"]

_Pending = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Write]


class JournalWriter:
    """A thread that makes the writes of async invocations durable, in batches.

    Args:
        backend: returns the journal (read for every batch: tests swap it).
        name: names the thread.
    """

    def __init__(self, backend: Callable[[], JournalBackend], name: str) -> None:
        self._backend = backend
        self._name = name
        # A SimpleQueue: its C-level blocking get wakes the thread several times
        # faster than a threading.Condition, which is what a lone write waits for.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._checked: object = None  # the backend last seen, and whether it has write_batch
        self._batches = False

    def write(self, write: Write) -> asyncio.Future[Any]:
        """Queue ``write``; the future resolves, on the calling loop, to what the single
        call would return, or fails with what it would raise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._thread is None:
            with self._lock:
                if self._closed:
                    raise BackendUnavailable("this Runtime is closed; its journal writer stopped")
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"runjournal-writer-{self._name}", daemon=True
                    )
                    self._thread.start()
        elif self._closed:
            raise BackendUnavailable("this Runtime is closed; its journal writer stopped")
        self._queue.put((loop, future, write))
        return future

    def close(self) -> None:
        """Finish what is queued, then stop. Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch: list[_Pending] = []
            stop = first is None
            if first is not None:
                batch.append(first)
            while True:  # everything queued meanwhile joins this batch
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        writes = [write for _, _, write in batch]
        try:
            backend = self._backend()
            if backend is not self._checked:  # a protocol isinstance costs microseconds
                self._checked, self._batches = backend, isinstance(backend, BatchWriter)
            if self._batches:
                results: list[Any] = backend.write_batch(writes)  # type: ignore[attr-defined]
            else:
                results = write_each(backend, writes)
        except BaseException as exc:  # the batch failed as a whole: every write fails
            if not isinstance(exc, Exception):
                emit(logging.ERROR, "journal writer: a batch was interrupted: %r", exc)
            results = [exc] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for (loop, future, _), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((future, result))
        for loop, settled in by_loop.items():
            # A closed loop's waiters are gone: nobody needs these results any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the loop: resolve each future with its write's result (one wake-up per batch)."""
    for future, result in settled:
        if future.done():  # cancelled while the write was under way
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        elif isinstance(result, BaseException):
            future.set_exception(RuntimeError(f"the journal write was interrupted: {result!r}"))
        else:
            future.set_result(result)
