"""The in-memory engine: for tests and for trying things out."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import ClassVar
from urllib.parse import urlsplit

import attrs

from runjournal.journal import (
    BackendUnavailable,
    Capabilities,
    Entry,
    EntryConflict,
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    VersionConflict,
    Write,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
    write_each,
)

__all__ = ["MemoryBackend", "MemoryStore"]

_CAPABILITIES = Capabilities(persistent=False)


@attrs.define
class MemoryStore:
    """The data behind one or more :class:`MemoryBackend` clients.

    Records are kept in the shared on-disk format, so the memory engine
    exercises the same encoding (and corruption checks) as the others.
    """

    invocations: dict[str, bytes] = attrs.field(factory=dict)
    entries: dict[str, dict[int, bytes]] = attrs.field(factory=dict)
    lock: threading.Lock = attrs.field(factory=threading.Lock)


class MemoryBackend:
    """A thread-safe journal held in this process's memory.

    ``MemoryBackend()`` has a store of its own; clients built on the same
    :class:`MemoryStore` share it. ``memory://name`` URLs share one named
    store per process for as long as a client of it is open.
    """

    _named: ClassVar[weakref.WeakValueDictionary[str, MemoryStore]] = weakref.WeakValueDictionary()
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Open ``memory://`` (a fresh store) or ``memory://name`` (a shared one); no options."""
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ValueError(f"not a memory:// URL: {url!r}")
        name = parts.netloc + parts.path
        if not name:
            return cls()
        with cls._named_lock:
            store = cls._named.get(name)
            if store is None:
                store = MemoryStore()
                cls._named[name] = store
        return cls(store)

    @property
    def capabilities(self) -> Capabilities:
        return _CAPABILITIES

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("this memory journal client is closed")

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        self._check_open()
        with self.store.lock:
            existing = self.store.invocations.get(invocation.id)
            if existing is not None:
                return decode_invocation(existing), False
            stored = attrs.evolve(invocation, version=1)
            self.store.invocations[invocation.id] = encode_invocation(stored)
            return stored, True

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        self._check_open()
        data = self.store.invocations.get(invocation_id)
        return None if data is None else decode_invocation(data)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        self._check_open()
        with self.store.lock:
            data = self.store.invocations.get(invocation.id)
            if data is None:
                raise InvocationNotFound(invocation.id)
            current = decode_invocation(data)
            if current.version != invocation.version:
                raise VersionConflict(invocation.id, invocation.version, current.version)
            stored = attrs.evolve(invocation, version=invocation.version + 1)
            self.store.invocations[invocation.id] = encode_invocation(stored)
            return stored

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        self._check_open()
        with self.store.lock:
            raw = self.store.entries.get(invocation_id, {})
            items = sorted((i, b) for i, b in raw.items() if i >= start)
        return [decode_entry(b, invocation_id) for _, b in items]

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        self._check_open()
        data = encode_entry(entry, invocation_id)
        with self.store.lock:
            if invocation_id not in self.store.invocations:
                raise InvocationNotFound(invocation_id)
            slots = self.store.entries.setdefault(invocation_id, {})
            if entry.index in slots:
                raise EntryConflict(invocation_id, entry.index)
            slots[entry.index] = data

    def write_batch(self, writes: Sequence[Write]) -> list[object]:
        """Each write as its single call (see :class:`runjournal.journal.BatchWriter`)."""
        self._check_open()
        return write_each(self, writes)

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        self._check_open()
        with self.store.lock:
            records = sorted(self.store.invocations.items())
        for invocation_id, data in records:
            if status is None or decode_invocation(data).status is status:
                yield invocation_id

    def delete_invocation(self, invocation_id: str) -> bool:
        self._check_open()
        with self.store.lock:
            self.store.entries.pop(invocation_id, None)
            return self.store.invocations.pop(invocation_id, None) is not None

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> MemoryBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryBackend(store={id(self.store):#x})"
