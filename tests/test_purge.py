"""Retention: ``purge`` / ``Runtime.purge`` on every engine (memory, LMDB, S3 on moto)."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from runjournal.context import PurgeStep, Runtime, TerminalError, purge, set_testing
from runjournal.context._lease import WORKER_HANDLER, worker_record_id
from runjournal.journal import (
    Invocation,
    InvocationStatus,
    JournalBackend,
    Lease,
)
from runjournal.journal.testing import make_entry, make_invocation

DAY = 86400.0
NOW = time.time()
PENDING = InvocationStatus.PENDING
COMPLETED = InvocationStatus.COMPLETED
FAILED = InvocationStatus.FAILED

Open = Callable[[], JournalBackend]


def _store(backend: JournalBackend, inv: Invocation, entries: int = 2) -> None:
    backend.create_invocation(inv)
    for index in range(entries):
        backend.append_entry(inv.id, make_entry(index, created_at=inv.created_at + index))


def _aged(inv_id: str, status: InvocationStatus, days: float, **changes: Any) -> Invocation:
    at = NOW - days * DAY
    output = b'"done"' if status is COMPLETED else None
    return make_invocation(
        inv_id, status=status, created_at=at - 5, updated_at=at, output=output, **changes
    )


def _worker_record(owner: str, *, days: float, expires_at: float) -> Invocation:
    at = NOW - days * DAY
    return Invocation(
        id=worker_record_id(owner),
        handler=WORKER_HANDLER,
        input=b"",
        codec="json",
        status=COMPLETED,
        output=b"null",
        created_at=at,
        updated_at=at,
        lease=Lease(owner, 7, 0, expires_at),
    )


def _ids(backend: JournalBackend) -> set[str]:
    return set(backend.list_invocations())


def test_purge_removes_exactly_the_old_finished_invocations_and_their_entries(
    new_backend: Open,
) -> None:
    backend = new_backend()
    _store(backend, _aged("old-done", COMPLETED, 8))
    _store(backend, _aged("old-failed", FAILED, 30))
    _store(backend, _aged("new-done", COMPLETED, 6))
    _store(backend, _aged("new-failed", FAILED, 0.1))
    _store(backend, _aged("old-pending", PENDING, 40))
    steps: list[PurgeStep] = []

    removed = purge(backend, older_than=7 * DAY, progress=steps.append, now=NOW)

    assert removed == 2
    assert _ids(backend) == {"new-done", "new-failed", "old-pending"}
    for gone in ("old-done", "old-failed"):
        assert backend.get_invocation(gone) is None
        assert backend.read_entries(gone) == []
    for kept in ("new-done", "new-failed", "old-pending"):
        assert [e.index for e in backend.read_entries(kept)] == [0, 1]
    assert sorted(s.invocation_id for s in steps) == ["old-done", "old-failed"]
    assert [(s.done, s.total, s.removed, s.skipped) for s in steps] == [
        (1, 2, True, None),
        (2, 2, True, None),
    ]
    # The same purge again finds nothing.
    assert purge(backend, older_than=7 * DAY, now=NOW) == 0


def test_statuses_and_durations(new_backend: Open) -> None:
    backend = new_backend()
    _store(backend, _aged("done", COMPLETED, 3))
    _store(backend, _aged("failed", FAILED, 3))
    td = datetime.timedelta(days=2)
    assert purge(backend, older_than=td, statuses=["failed"], now=NOW) == 1
    assert _ids(backend) == {"done"}
    assert purge(backend, older_than=td, statuses=(COMPLETED,), now=NOW) == 1
    assert _ids(backend) == set()
    with pytest.raises(ValueError, match="include_pending=True"):
        purge(backend, older_than=td, statuses=["pending"])
    with pytest.raises(ValueError, match="names no status"):
        purge(backend, older_than=td, statuses=[])
    with pytest.raises(ValueError, match="older_than must be a duration >= 0"):
        purge(backend, older_than=-1)
    with pytest.raises(ValueError, match="'running' is not a valid InvocationStatus"):
        purge(backend, older_than=1, statuses=["running"])


def test_a_dry_run_removes_nothing_and_counts_the_same(new_backend: Open) -> None:
    backend = new_backend()
    for i in range(3):
        _store(backend, _aged(f"old-{i}", COMPLETED, 10))
    _store(backend, _aged("young", COMPLETED, 1))
    steps: list[PurgeStep] = []
    assert purge(backend, older_than=7 * DAY, dry_run=True, progress=steps.append, now=NOW) == 3
    assert _ids(backend) == {"old-0", "old-1", "old-2", "young"}
    assert [s.removed for s in steps] == [True, True, True]
    assert purge(backend, older_than=7 * DAY, now=NOW) == 3
    assert _ids(backend) == {"young"}


def test_pending_invocations_only_with_the_second_switch_and_never_a_held_one(
    new_backend: Open,
) -> None:
    backend = new_backend()
    expired = Lease("worker-a", 11, 1, NOW - 9 * DAY)  # no liveness record: void
    released = Lease("worker-b", 0, 2, 0.0)
    held = Lease("worker-c", 12, 1, NOW + 3600)  # a current lease
    renewed = Lease("worker-d", 13, 1, NOW - 9 * DAY)  # expired, but its worker is alive
    _store(backend, _aged("orphan", PENDING, 9, lease=expired))
    _store(backend, _aged("released", PENDING, 9, lease=released))
    _store(backend, _aged("no-lease", PENDING, 9))
    _store(backend, _aged("held", PENDING, 9, lease=held))
    _store(backend, _aged("renewed", PENDING, 9, lease=renewed))
    backend.create_invocation(
        attrs.evolve(
            _worker_record("worker-d", days=0, expires_at=NOW + 3600),
            lease=Lease("worker-d", 13, 0, NOW + 3600),
        )
    )
    # Old record, but a step was journaled an hour ago: still alive.
    _store(backend, _aged("busy", PENDING, 9), entries=0)
    backend.append_entry("busy", make_entry(0, created_at=NOW - 3600))

    assert purge(backend, older_than=7 * DAY, now=NOW) == 0  # pending: never by default
    steps: list[PurgeStep] = []
    removed = purge(
        backend, older_than=7 * DAY, include_pending=True, progress=steps.append, now=NOW
    )
    assert removed == 3
    left = _ids(backend)
    assert {"orphan", "released", "no-lease"}.isdisjoint(left)
    assert {"held", "renewed", "busy"} <= left
    skipped = {s.invocation_id: s.skipped for s in steps if not s.removed}
    assert set(skipped) == {"held", "renewed"}
    assert "worker 'worker-c' holds its lease" in (skipped["held"] or "")
    assert "worker 'worker-d' holds its lease" in (skipped["renewed"] or "")
    assert [e.index for e in backend.read_entries("busy")] == [0]


def test_worker_records_are_removed_only_once_dead_and_old(new_backend: Open) -> None:
    backend = new_backend()
    backend.create_invocation(_worker_record("live", days=30, expires_at=NOW + 60))
    backend.create_invocation(_worker_record("dead-old", days=30, expires_at=0.0))
    backend.create_invocation(_worker_record("dead-new", days=1, expires_at=NOW - DAY))
    steps: list[PurgeStep] = []
    assert purge(backend, older_than=7 * DAY, progress=steps.append, now=NOW) == 1
    assert _ids(backend) == {worker_record_id("live"), worker_record_id("dead-new")}
    [kept] = [s for s in steps if not s.removed]
    assert "is alive" in (kept.skipped or "")


class _RacingClient:
    """A journal client whose first compare-and-swap loses to another worker's."""

    def __init__(self, backend: JournalBackend, rival: JournalBackend) -> None:
        self.backend = backend
        self.rival = rival
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        if not self.raced:
            self.raced = True
            stored = self.rival.get_invocation(invocation.id)
            assert stored is not None
            taken = Lease("rival", 99, 5, time.time() + 3600)
            self.rival.update_invocation(attrs.evolve(stored, lease=taken))
        return self.backend.update_invocation(invocation)


def test_a_pending_invocation_a_worker_takes_meanwhile_is_kept(one_journal: Open) -> None:
    backend = one_journal()
    _store(backend, _aged("contested", PENDING, 9, lease=Lease("gone", 3, 1, NOW - 9 * DAY)))
    racing = _RacingClient(backend, one_journal())
    steps: list[PurgeStep] = []
    removed = purge(
        racing,  # type: ignore[arg-type]
        older_than=7 * DAY,
        include_pending=True,
        progress=steps.append,
        now=NOW,
    )
    assert removed == 0
    assert steps[0].skipped is not None and "changed while purge looked" in steps[0].skipped
    stored = backend.get_invocation("contested")
    assert stored is not None and stored.lease is not None and stored.lease.owner == "rival"
    assert len(backend.read_entries("contested")) == 2


def test_runtime_purge_removes_what_its_handlers_finished(new_backend: Open) -> None:
    set_testing(True)
    try:
        rt = Runtime(new_backend())

        @rt.handler("t.ok")
        def ok(ctx: Any, n: int) -> int:
            return int(ctx.run(lambda: n * 2, name="double"))

        @rt.handler("t.fails")
        def fails(ctx: Any, n: int) -> int:
            ctx.run(lambda: n, name="first")
            raise TerminalError("no")

        assert rt.invoke("t.ok", 2, invocation_id="a") == 4
        with pytest.raises(TerminalError):
            rt.invoke("t.fails", 1, invocation_id="b")
        assert rt.purge(older_than=3600) == 0  # too young
        with pytest.raises(ValueError, match="include_pending"):
            rt.purge(older_than=0, statuses=["pending", "completed"])
        assert rt.purge(older_than=0, dry_run=True) == 2
        assert rt.purge(older_than=datetime.timedelta(0)) == 2
        assert rt.status("a") is None and rt.status("b") is None
        assert rt.backend.read_entries("a") == []
        # The id may be used again: a new invocation, run from scratch.
        assert rt.invoke("t.ok", 5, invocation_id="a") == 10
        rt.close()
    finally:
        set_testing(False)


def test_a_current_lease_of_a_process_that_is_gone_is_void(new_backend: Open) -> None:
    """A lease of a default worker id of this host whose process exited holds nothing,
    whatever its expiry (a worker SIGKILLed a moment ago)."""
    code = "from runjournal.context._lease import default_worker_id; print(default_worker_id())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead_owner = done.stdout.strip()
    backend = new_backend()
    _store(backend, _aged("orphan", PENDING, 9, lease=Lease(dead_owner, 5, 1, NOW + 3600)))
    _store(backend, _aged("held", PENDING, 9, lease=Lease("elsewhere", 5, 1, NOW + 3600)))
    assert purge(backend, older_than=7 * DAY, include_pending=True, now=NOW) == 1
    assert _ids(backend) == {"held"}
