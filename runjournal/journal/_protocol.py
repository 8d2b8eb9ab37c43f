"""The contract between the run/retry core and a storage engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import attrs

from runjournal.journal._errors import JournalError
from runjournal.journal._records import Entry, Invocation, InvocationStatus

__all__ = [
    "AppendEntry",
    "BatchWriter",
    "Capabilities",
    "CreateInvocation",
    "JournalBackend",
    "UpdateInvocation",
    "Write",
    "write_each",
]


@attrs.frozen
class Capabilities:
    """What an engine can promise; only what the core or the kit branches on.

    Attributes:
        persistent: records outlive the process and a closed client
            (the kit's reopen tests run only then).
        max_payload_bytes: the largest encoded record the engine accepts, or
            None for no limit; the core refuses a bigger result with a clear
            error before it reaches the engine.
    """

    persistent: bool
    max_payload_bytes: int | None = None


@runtime_checkable
class JournalBackend(Protocol):
    """A journal store. Every method is synchronous and thread-safe.

    Every method of a closed client raises :class:`BackendUnavailable`.

    Engines raise only :mod:`journal` exceptions. Records are handed over as
    attrs instances; how they are laid out is the engine's business (the
    built-in engines use :func:`runjournal.journal.encode_entry` and friends).
    """

    @property
    def capabilities(self) -> Capabilities:
        """What this engine promises."""
        ...

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        """Store ``invocation`` unless its id exists; atomic create-or-get.

        Returns:
            The stored record (version 1 when just created) and whether this
            call created it. An existing record is returned unchanged.
        """
        ...

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        """Return the stored invocation, or None."""
        ...

    def update_invocation(self, invocation: Invocation) -> Invocation:
        """Replace the stored record if its version is ``invocation.version``.

        Returns:
            The record as stored, its version one higher.

        Raises:
            VersionConflict: the stored version differs (someone else wrote).
            InvocationNotFound: nothing is stored under that id.
        """
        ...

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        """Return the entries with index >= ``start``, in index order (gaps allowed).

        An id with no invocation has no entries: the result is empty.
        """
        ...

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        """Write ``entry`` at ``entry.index``, create-only; durable on return.

        Raises:
            EntryConflict: an entry already exists at that index.
            InvocationNotFound: no invocation is stored under that id (entries
                never outlive their invocation, so a later invocation reusing
                the id cannot replay them).
        """
        ...

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        """Yield the ids of invocations with ``status`` (all if None), sorted."""
        ...

    def delete_invocation(self, invocation_id: str) -> bool:
        """Delete an invocation and all its entries; False if there was none."""
        ...

    def close(self) -> None:
        """Release resources; later calls raise BackendUnavailable. Idempotent."""
        ...


# -- optional: several writes, one durable commit ------------------------------------


@attrs.frozen
class AppendEntry:
    """A write for :meth:`BatchWriter.write_batch`: ``append_entry(invocation_id, entry)``."""

    invocation_id: str
    entry: Entry


@attrs.frozen
class CreateInvocation:
    """A write for :meth:`BatchWriter.write_batch`: ``create_invocation(invocation)``."""

    invocation: Invocation


@attrs.frozen
class UpdateInvocation:
    """A write for :meth:`BatchWriter.write_batch`: ``update_invocation(invocation)``."""

    invocation: Invocation


Write = AppendEntry | CreateInvocation | UpdateInvocation


@runtime_checkable
class BatchWriter(Protocol):
    """An optional method: several writes made durable together.

    The async runtime hands an engine the writes of many concurrent
    invocations at once; an engine with this method can commit them in one
    durable transaction (LMDB) or send them in parallel (S3). Engines without
    it get them one call at a time. The conformance kit checks it when present.
    """

    def write_batch(self, writes: Sequence[Write]) -> list[object]:
        """Do each write as its single call would, in order; one durable commit if possible.

        Each write stands alone: one refused (a conflict, a missing
        invocation) writes nothing and does not stop the others.

        Returns:
            For each write, in order: what its single call returns (None for
            an append, ``(stored, created)`` for a create, the stored record
            for an update), or the :class:`JournalError` it would raise.

        Raises:
            JournalError: the batch as a whole failed (the store is
                unreachable, the client closed); none of it may be durable.
        """
        ...


def write_each(backend: JournalBackend, writes: Sequence[Write]) -> list[object]:
    """``write_batch`` for an engine without it: one call per write, in order.

    A :class:`JournalError` raised by one write is that write's result; any
    other exception propagates.
    """
    results: list[object] = []
    for write in writes:
        try:
            if isinstance(write, AppendEntry):
                backend.append_entry(write.invocation_id, write.entry)
                results.append(None)
            elif isinstance(write, CreateInvocation):
                results.append(backend.create_invocation(write.invocation))
            else:
                results.append(backend.update_invocation(write.invocation))
        except JournalError as exc:
            results.append(exc)
    return results
