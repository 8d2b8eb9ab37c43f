"""What one client knows of the invocations it touched: a bounded, thread-safe cache.

Every byte here is authoritative (read from the store, or written by this
client with a conditional write that succeeded), so the engine can skip
requests with it: the record's ETag for a compare-and-swap without a read
first, "this invocation exists" for an append without a check first, and
the gap-free run of entries it packs into a segment. Forgetting is always
safe; it only costs a request later.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

import attrs

from runjournal.journal import InvocationStatus

__all__ = ["STATE_LIMIT", "KnownInvocations", "KnownRecord", "PackJob"]

#: Invocations tracked per client; the least recently used are forgotten.
STATE_LIMIT: Final = 512


@attrs.frozen
class KnownRecord:
    """The invocation record as last read or written by this client.

    ``marked`` is the version whose status marker stands for ``status``, when
    this client wrote it (None: read from the store, so not known).
    """

    version: int
    etag: str
    status: InvocationStatus
    marked: int | None = None


@attrs.define
class _Known:
    """What this client knows of one invocation (the cache's lock guards it).

    ``entries`` holds records read from the store or written by this client;
    ``contiguous`` is the length of the gap-free run [0, contiguous) in it;
    ``segment_end`` the end of the newest segment known; ``loaded`` says the
    journal was read (or created) here. ``exists`` says the record was seen
    (read, written, or found by a check); ``record`` is the last one read or
    written.
    """

    entries: dict[int, bytes] = attrs.field(factory=dict)
    contiguous: int = 0
    segment_end: int = 0
    loaded: bool = False
    packing: bool = False
    exists: bool = False
    record: KnownRecord | None = None

    def merge(self, records: Iterable[tuple[int, bytes]]) -> None:
        for index, data in records:
            self.entries.setdefault(index, data)
        while self.contiguous in self.entries:
            self.contiguous += 1

    def reset(self, records: Iterable[tuple[int, bytes]] = (), segment_end: int = 0) -> None:
        """Know exactly ``records`` (the whole journal as just read, or nothing)."""
        self.entries = {}
        self.contiguous = 0
        self.segment_end = segment_end
        self.merge(records)
        self.loaded = True

    def note_record(self, record: KnownRecord) -> None:
        if self.record is not None and record.version < self.record.version:
            # Deleted and created again by someone else: what we knew is void.
            self.reset()
            self.loaded = False
        self.record = record
        self.exists = True


@attrs.frozen(eq=False)
class PackJob:
    """A gap-free run [0, end) to write as one segment; ``previous`` is the segment it replaces."""

    end: int
    previous: int
    records: list[bytes]
    state: _Known


class KnownInvocations:
    """The per-invocation knowledge of one client: an LRU of at most ``limit`` invocations.

    Thread-safe; every method takes the lock for its own duration only.
    """

    def __init__(self, limit: int = STATE_LIMIT) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._lock = threading.Lock()
        self._states: OrderedDict[str, _Known] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def _state(self, invocation_id: str, *, create: bool = True) -> _Known | None:
        """The state of an invocation, marked most recently used (lock held)."""
        known = self._states.get(invocation_id)
        if known is not None:
            self._states.move_to_end(invocation_id)
        elif create:
            known = self._states[invocation_id] = _Known()
            while len(self._states) > self.limit:
                self._states.popitem(last=False)
        return known

    # -- the record ------------------------------------------------------------------

    def record(self, invocation_id: str) -> KnownRecord | None:
        """The record as last read or written here, or None if not known."""
        with self._lock:
            known = self._state(invocation_id, create=False)
            return None if known is None else known.record

    def exists(self, invocation_id: str) -> bool:
        """Whether this client has seen the invocation's record (and not forgotten it)."""
        with self._lock:
            known = self._state(invocation_id, create=False)
            return known is not None and known.exists

    def remember_record(self, invocation_id: str, record: KnownRecord) -> None:
        """Note a record just read or written (an older version voids the entries known)."""
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            known.note_record(record)

    def created(self, invocation_id: str, record: KnownRecord) -> None:
        """Note an invocation this client just created: it has no entries yet."""
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            known.note_record(record)
            known.reset()

    def confirm_exists(self, invocation_id: str) -> None:
        """Note that a check found the invocation's record."""
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            known.exists = True

    # -- entries ---------------------------------------------------------------------

    def add_entry(self, invocation_id: str, index: int, data: bytes) -> int:
        """Note an entry this client wrote; return how many of the run are not yet packed."""
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            known.merge([(index, data)])
            return known.contiguous - known.segment_end

    def read(
        self,
        invocation_id: str,
        records: list[tuple[int, bytes]],
        segment_end: int,
        *,
        whole: bool,
    ) -> None:
        """Note entries just read, and the newest segment seen.

        Args:
            whole: the read started at index 0, so ``records`` is the whole
                journal and replaces what was known (the store has the last word).
        """
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            if whole:
                known.reset(records, segment_end)
            else:
                known.merge(records)
                known.segment_end = max(known.segment_end, segment_end)

    def is_loaded(self, invocation_id: str) -> bool:
        """Whether this client read (or created) the whole journal."""
        with self._lock:
            known = self._state(invocation_id, create=False)
            return known is not None and known.loaded

    def begin_pack(self, invocation_id: str) -> PackJob | None:
        """Claim the run to pack, if one longer than the newest segment is known.

        None when there is nothing new to pack or another thread is packing;
        otherwise the caller must hand the job to :meth:`end_pack`.
        """
        with self._lock:
            known = self._state(invocation_id, create=False)
            if known is None or known.packing or known.contiguous <= known.segment_end:
                return None
            end = known.contiguous
            known.packing = True
            return PackJob(end, known.segment_end, [known.entries[i] for i in range(end)], known)

    def end_pack(self, job: PackJob, *, packed: bool) -> None:
        """Release a claim; ``packed``: the segment [0, job.end) is settled (written or skipped)."""
        with self._lock:
            if packed:
                job.state.segment_end = max(job.state.segment_end, job.end)
            job.state.packing = False

    # -- forgetting ------------------------------------------------------------------

    def release_entries(self, invocation_id: str) -> None:
        """Drop the entries known (a finished journal), keep what is known of the record."""
        with self._lock:
            known = self._states.get(invocation_id)
            if known is not None and not known.packing:
                segment_end = known.segment_end
                known.reset(segment_end=segment_end)
                known.loaded = False

    def forget(self, invocation_id: str) -> None:
        """Know nothing of an invocation (it is gone, or about to be)."""
        with self._lock:
            self._states.pop(invocation_id, None)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
