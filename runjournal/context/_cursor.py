"""The replay cursor: hands out journal indexes and matches them to the journal.

It knows nothing of how closures run, so ``run``, futures and a future async
context share it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from runjournal.context._errors import NonDeterminismError
from runjournal.journal import Entry, EntryKind, JournalBackend, JournalCorrupt

__all__ = ["ReplayCursor", "describe"]


def describe(kind: EntryKind, name: str | None) -> str:
    """How a step is named in error messages."""
    return f"{kind.value} {name!r}" if name is not None else f"unnamed {kind.value}"


class ReplayCursor:
    """The position of one invocation attempt in its journal. Thread-safe."""

    def __init__(self, backend: JournalBackend, invocation_id: str, recorded: Iterable[Entry]):
        self.backend = backend
        self.invocation_id = invocation_id
        self._recorded = {entry.index: entry for entry in recorded}
        self._next = 0
        self._lock = threading.Lock()

    @property
    def next_index(self) -> int:
        """The index the next step will take."""
        return self._next

    def has(self, index: int) -> bool:
        """Whether an entry at ``index`` is journaled (as far as this attempt knows)."""
        return index in self._recorded

    def is_replaying(self) -> bool:
        """Whether steps not yet reached are already in the journal."""
        with self._lock:
            return any(index >= self._next for index in self._recorded)

    def reserve(self, kind: EntryKind, name: str | None) -> tuple[int, Entry | None]:
        """Take the next index; return it with the entry recorded there, if any.

        Raises:
            NonDeterminismError: the recorded entry is of another kind or name.
        """
        with self._lock:
            index = self._next
            self._next += 1
            entry = self._recorded.get(index)
        if entry is not None and (entry.kind is not kind or entry.name != name):
            raise NonDeterminismError(
                self.invocation_id,
                index,
                recorded=describe(entry.kind, entry.name),
                asked=describe(kind, name),
            )
        return index, entry

    def record(self, entry: Entry) -> None:
        """Append ``entry`` create-only; it is durable when this returns.

        Raises:
            EntryConflict: another worker recorded this index first.
        """
        self.backend.append_entry(self.invocation_id, entry)
        with self._lock:
            self._recorded[entry.index] = entry

    def note(self, entry: Entry) -> None:
        """Remember ``entry`` as journaled (someone else appended it for this attempt)."""
        with self._lock:
            self._recorded[entry.index] = entry

    def fetch(self, index: int, kind: EntryKind, name: str | None) -> Entry:
        """Read the entry another worker recorded at ``index`` (after a conflict).

        Raises:
            NonDeterminismError: it is of another kind or name.
            JournalCorrupt: the journal said there is one, and there is none.
        """
        entries = self.backend.read_entries(self.invocation_id, index)
        found = [e for e in entries if e.index == index]
        if not found:
            raise JournalCorrupt(
                f"invocation {self.invocation_id!r}: appending at index {index} conflicted, "
                "but no entry is there"
            )
        entry = found[0]
        if entry.kind is not kind or entry.name != name:
            raise NonDeterminismError(
                self.invocation_id,
                index,
                recorded=describe(entry.kind, entry.name),
                asked=describe(kind, name),
            )
        with self._lock:
            self._recorded[index] = entry
        return entry
