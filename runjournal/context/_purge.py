"""Retention: remove old invocations (and their entries) from a journal.

Works on any :class:`runjournal.journal.JournalBackend` through the protocol
alone (list, get, update, read, delete), so every engine purges the same way.

What is old: a finished (completed or failed) invocation is as old as its
last write, when it finished. A pending one is as old as its last sign of
life: the last write to its record or its newest entry, whichever is later.

What is never removed:

- a pending invocation, unless asked for explicitly (``include_pending``):
  a later ``invoke`` or ``recover`` would resume it, and once removed it
  would start again from scratch;
- an invocation whose lease a live worker holds: deleting what a worker is
  running is unsafe (its next writes fail, its closures may already have
  run). Before a pending invocation is removed, purge takes its lease by
  compare-and-swap, so no worker can take it meanwhile;
- a worker's liveness record (see :func:`runjournal.context.is_worker_record`)
  whose lease has not expired. An expired one is removed like any completed
  invocation of its age. (It also marks fenced incarnations dead; a worker
  stalled for longer than ``older_than`` whose record is gone would not learn
  it was fenced: choose ``older_than`` far longer than any stall.)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Collection, Iterable

import attrs

from runjournal.context._lease import (
    RELEASED,
    default_worker_id,
    is_worker_record,
    process_gone,
    worker_record_id,
)
from runjournal.context._options import Duration, seconds
from runjournal.journal import (
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalBackend,
    Lease,
    VersionConflict,
)

__all__ = ["FINISHED", "PurgeStep", "Statuses", "holder_of", "last_activity", "purge"]

#: The statuses purged by default.
FINISHED: tuple[InvocationStatus, ...] = (InvocationStatus.COMPLETED, InvocationStatus.FAILED)
#: Which statuses to purge: InvocationStatus values or their names ("completed").
Statuses = Iterable[InvocationStatus | str]
#: How long purge's own lease on a pending invocation lasts (between taking it and deleting).
_PURGE_LEASE = 60.0


@attrs.frozen
class PurgeStep:
    """What :func:`purge` did with one invocation old enough to match (its progress).

    Attributes:
        invocation_id: the invocation.
        status: its status when it was looked at.
        done: matching invocations handled so far, this one included.
        total: matching invocations found.
        removed: it was removed (in a dry run: it would be).
        skipped: why it was not removed (a live worker holds it, it changed
            meanwhile), or None.
    """

    invocation_id: str
    status: InvocationStatus
    done: int
    total: int
    removed: bool
    skipped: str | None = None


def purge(
    backend: JournalBackend,
    *,
    older_than: Duration,
    statuses: Statuses = FINISHED,
    include_pending: bool = False,
    dry_run: bool = False,
    progress: Callable[[PurgeStep], None] | None = None,
    now: float | None = None,
) -> int:
    """Remove invocations with one of ``statuses`` older than ``older_than``, with their entries.

    Args:
        backend: the journal.
        older_than: how old (float seconds or timedelta): finished that long
            ago, or, for a pending one, no write for that long.
        statuses: which statuses to remove (default completed and failed).
        include_pending: remove old pending invocations too (the explicit
            second switch pending ones need; adds PENDING to ``statuses``).
            One a live worker holds is skipped all the same.
        dry_run: remove nothing; count (and report) what would be removed.
        progress: called once per matching invocation, after it was handled.
        now: the wall-clock time ages are measured from (default: now).

    Returns:
        How many invocations were removed (in a dry run: would be).

    Raises:
        ValueError: ``statuses`` names PENDING without ``include_pending``,
            or names no status, or ``older_than`` is negative.
        JournalError: the journal failed (what was removed before stays removed).
    """
    wanted = _statuses(statuses, include_pending)
    cutoff = (time.time() if now is None else now) - seconds(older_than, "older_than")
    matches = list(_matching(backend, wanted, cutoff))
    removed = 0
    for done, inv in enumerate(matches, start=1):
        skipped = _why_keep(backend, inv, time.time() if now is None else now)
        if skipped is None and not dry_run:
            skipped = _remove(backend, inv)
        if skipped is None:
            removed += 1
        if progress is not None:
            progress(PurgeStep(inv.id, inv.status, done, len(matches), skipped is None, skipped))
    return removed


def _statuses(statuses: Statuses, include_pending: bool) -> list[InvocationStatus]:
    if isinstance(statuses, (str, InvocationStatus)):
        statuses = [statuses]
    wanted = {InvocationStatus(s) for s in statuses}
    if InvocationStatus.PENDING in wanted and not include_pending:
        raise ValueError(
            "pending invocations are purged only with include_pending=True: a pending "
            "invocation may still be resumed, and once purged it starts again from scratch"
        )
    if include_pending:
        wanted.add(InvocationStatus.PENDING)
    if not wanted:
        raise ValueError("statuses names no status: nothing would be purged")
    return sorted(wanted, key=list(InvocationStatus).index)


def _matching(
    backend: JournalBackend, wanted: Collection[InvocationStatus], cutoff: float
) -> Iterable[Invocation]:
    for status in wanted:
        for inv_id in list(backend.list_invocations(status)):
            inv = backend.get_invocation(inv_id)
            if inv is None or inv.status is not status:
                continue  # deleted or changed since it was listed
            if last_activity(backend, inv, cheap_first=cutoff) < cutoff:
                yield inv


def last_activity(backend: JournalBackend, inv: Invocation, *, cheap_first: float = 0.0) -> float:
    """When ``inv`` last showed a sign of life (wall-clock seconds).

    A finished invocation: its last write. A pending one: its last write or
    its newest entry, whichever is later (entries are read only when the
    record alone is older than ``cheap_first``).
    """
    last = max(inv.created_at, inv.updated_at)
    if inv.status is InvocationStatus.PENDING and last < cheap_first:
        entries = backend.read_entries(inv.id)
        last = max([last, *(entry.created_at for entry in entries)])
    return last


def holder_of(backend: JournalBackend, lease: Lease | None, now: float) -> str | None:
    """The worker holding ``lease`` now, or None if the lease is void. Reads only.

    A lease holds while it has not expired, or while its owner's liveness
    record says the same incarnation is alive; it is void once released, or
    when its owner is a process of this host that is gone.
    """
    if lease is None or lease.incarnation == RELEASED or process_gone(lease.owner):
        return None
    if now < lease.expires_at:
        return lease.owner
    record = backend.get_invocation(worker_record_id(lease.owner))
    alive = record.lease if record is not None else None
    if alive is not None and alive.incarnation == lease.incarnation and now < alive.expires_at:
        return lease.owner
    return None


def _why_keep(backend: JournalBackend, inv: Invocation, now: float) -> str | None:
    if is_worker_record(inv):
        lease = inv.lease
        if lease is not None and now < lease.expires_at:
            return f"the worker {lease.owner!r} is alive (its liveness record is current)"
        return None
    if inv.status is not InvocationStatus.PENDING:
        return None
    holder = holder_of(backend, inv.lease, now)
    if holder is not None:
        return f"worker {holder!r} holds its lease (it may be running)"
    return None


def _remove(backend: JournalBackend, inv: Invocation) -> str | None:
    """Delete ``inv``; None if done, else why not."""
    if inv.status is InvocationStatus.PENDING and not is_worker_record(inv):
        # Take the lease first, by compare-and-swap: a worker that took the
        # invocation since it was looked at makes this fail, and none can take
        # it between this write and the delete.
        epoch = inv.lease.epoch + 1 if inv.lease is not None else 1
        # An incarnation no liveness record names: void once it expires (or once
        # this process is gone), should purge die before the delete.
        incarnation = secrets.randbits(62) + 1
        ours = Lease(default_worker_id(), incarnation, epoch, time.time() + _PURGE_LEASE)
        try:
            backend.update_invocation(attrs.evolve(inv, updated_at=time.time(), lease=ours))
        except VersionConflict:
            return "it changed while purge looked at it (a worker may have taken it)"
        except InvocationNotFound:
            return "it was deleted meanwhile"
    if not backend.delete_invocation(inv.id):
        return "it was deleted meanwhile"
    return None
