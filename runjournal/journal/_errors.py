"""The exceptions every engine raises; callers never see an SDK's own."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "CodecError",
    "ConflictError",
    "EntryConflict",
    "InvocationNotFound",
    "JournalCorrupt",
    "JournalError",
    "TransientError",
    "VersionConflict",
]


class JournalError(Exception):
    """Base class of every error a journal backend raises."""


class ConflictError(JournalError):
    """A write lost a race with another writer; nothing was written."""


class EntryConflict(ConflictError):
    """An entry already exists at that index (appends are create-only)."""

    def __init__(self, invocation_id: str, index: int) -> None:
        super().__init__(
            f"invocation {invocation_id!r}: an entry already exists at index {index}; "
            "another worker recorded this step first"
        )
        self.invocation_id = invocation_id
        self.index = index


class VersionConflict(ConflictError):
    """The invocation record changed since it was read (compare-and-swap failed)."""

    def __init__(self, invocation_id: str, expected: int, actual: int | None) -> None:
        super().__init__(
            f"invocation {invocation_id!r}: expected version {expected}, "
            f"found {'nothing' if actual is None else actual}; re-read it and try again"
        )
        self.invocation_id = invocation_id
        self.expected = expected
        self.actual = actual


class InvocationNotFound(JournalError, LookupError):
    """No invocation is stored under that id."""

    def __init__(self, invocation_id: str) -> None:
        super().__init__(f"no invocation {invocation_id!r} in this journal")
        self.invocation_id = invocation_id


class TransientError(JournalError):
    """The store failed in a way a retry may fix (throttling, a 5xx, a dropped link)."""


class BackendUnavailable(JournalError):
    """The store cannot be used as configured (missing, closed, denied, misconfigured)."""


class JournalCorrupt(JournalError):
    """Bytes read from the journal are not a valid record."""


class CodecError(JournalError, TypeError):
    """A codec could not encode a value or decode bytes."""
