"""Invocation ids for invocations the caller did not name."""

from __future__ import annotations

import os
import threading
import uuid

__all__ = ["new_invocation_id"]


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
