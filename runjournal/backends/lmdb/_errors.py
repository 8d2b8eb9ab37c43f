"""lmdb's exceptions translated into the journal's: callers never see an lmdb one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import lmdb

from runjournal.journal import BackendUnavailable, JournalCorrupt, JournalError, TransientError

__all__ = ["CORRUPT", "NOT_AN_ENVIRONMENT", "TRANSIENT", "mapped", "translate", "translate_open"]

# The database file is damaged: retrying cannot help.
CORRUPT: Final = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError)
# Out of reader slots, thread-local slots, or a failed disk write: may pass.
TRANSIENT: Final = (lmdb.ReadersFullError, lmdb.DiskError, lmdb.TlsFullError)
# At open: the directory holds something LMDB cannot (or this LMDB cannot) read.
NOT_AN_ENVIRONMENT: Final = (lmdb.InvalidError, lmdb.VersionMismatchError)


def translate(path: str, exc: lmdb.Error) -> JournalError:
    """The journal error an lmdb error stands for (its cause is set by the caller).

    :data:`CORRUPT` -> :class:`JournalCorrupt`, :data:`TRANSIENT` ->
    :class:`TransientError`, any other -> :class:`BackendUnavailable`.
    """
    if isinstance(exc, CORRUPT):
        return JournalCorrupt(f"LMDB journal {path}: the database file is damaged: {exc}")
    if isinstance(exc, TRANSIENT):
        return TransientError(f"LMDB journal {path}: {exc}")
    return BackendUnavailable(f"LMDB journal {path}: {exc}")


def translate_open(path: str, exc: lmdb.Error | OSError) -> BackendUnavailable:
    """The error to raise when ``lmdb.open(path)`` failed with ``exc``."""
    if isinstance(exc, NOT_AN_ENVIRONMENT):
        return BackendUnavailable(
            f"{path} is not an LMDB environment runjournal can open ({exc}); "
            "use a new directory for the journal"
        )
    return BackendUnavailable(
        f"cannot open LMDB journal {path}: {exc}. The directory must be writable by this process"
    )


@contextmanager
def mapped(path: str) -> Iterator[None]:
    """Turn lmdb's exceptions raised in the block into the journal's, chained."""
    try:
        yield
    except lmdb.Error as exc:
        raise translate(path, exc) from exc
