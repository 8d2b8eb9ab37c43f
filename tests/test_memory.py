"""The memory engine against the conformance kit."""

from __future__ import annotations

import pytest

from runjournal.backends import MemoryBackend, MemoryStore, open_backend
from runjournal.journal import JournalBackend
from runjournal.journal.testing import JournalBackendTests, Opener


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


class TestMemoryBackend(JournalBackendTests):
    @pytest.fixture
    def open_backend(self) -> Opener:
        store = MemoryStore()
        return lambda: MemoryBackend(store)

    def corrupt_entry(self, backend: JournalBackend, invocation_id: str, index: int) -> None:
        assert isinstance(backend, MemoryBackend)
        slots = backend.store.entries[invocation_id]
        slots[index] = _flip_last_byte(slots[index])

    def corrupt_invocation(self, backend: JournalBackend, invocation_id: str) -> None:
        assert isinstance(backend, MemoryBackend)
        records = backend.store.invocations
        records[invocation_id] = _flip_last_byte(records[invocation_id])


def test_memory_urls_share_named_stores_only() -> None:
    a, b, fresh = (
        open_backend("memory://shop"),
        open_backend("memory://shop"),
        open_backend("memory://"),
    )
    assert isinstance(a, MemoryBackend) and isinstance(b, MemoryBackend)
    assert a.store is b.store
    assert isinstance(fresh, MemoryBackend) and fresh.store is not a.store


def test_memory_url_refuses_options() -> None:
    with pytest.raises(TypeError, match="map_size"):
        open_backend("memory://?map_size=1")
