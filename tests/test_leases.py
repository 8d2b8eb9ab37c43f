"""Leases in one process: ownership, attach, takeover, fencing, recovery (every engine).

The multi-process versions (real workers, SIGKILL, SIGSTOP) are in test_workers.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from runjournal import (
    Context,
    InvocationStatus,
    InvocationTimeout,
    LeaseLost,
    Runtime,
    TerminalError,
)
from runjournal.context import WORKER_PREFIX, is_worker_record
from runjournal.journal import Invocation, JournalBackend, Lease, TransientError
from runjournal.journal.testing import make_entry, make_invocation

WAIT = 10.0

Opener = Callable[[], JournalBackend]


@pytest.fixture
def runtimes() -> Iterator[Callable[..., Runtime]]:
    made: list[Runtime] = []

    def make(backend: JournalBackend, **kwargs: Any) -> Runtime:
        rt = Runtime(backend, **kwargs)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


class Gate:
    """A closure that blocks until opened, counting its calls."""

    def __init__(self, value: str = "done") -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0
        self.value = value

    def __call__(self) -> str:
        self.calls += 1
        self.entered.set()
        assert self.opened.wait(WAIT)
        return self.value


def _gated_handler(rt: Runtime, gate: Gate, after: list[str] | None = None) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        value = ctx.run(gate, name="slow")
        log = after if after is not None else []
        value += "|" + ctx.run(lambda: log.append("after") or "after", name="after")
        return value


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


# -- the lease on the record -----------------------------------------------------------


def test_a_new_invocation_carries_this_workers_lease(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    rt = runtimes(one_journal(), worker_id="w-1")
    rt.handler("h")(lambda ctx, x: ctx.run(lambda: x, name="s"))
    before = time.time()
    assert rt.invoke("h", 1, invocation_id="inv") == 1
    stored = rt.backend.get_invocation("inv")
    assert stored is not None and stored.lease is not None
    assert (stored.lease.owner, stored.lease.epoch) == ("w-1", 1)
    assert stored.lease.expires_at >= before + rt.lease - 1
    # A short invocation needs no liveness record: nothing but the invocation is listed.
    assert list(rt.backend.list_invocations()) == ["inv"]


def test_reserved_ids_are_refused(one_journal: Opener, runtimes: Callable[..., Runtime]) -> None:
    rt = runtimes(one_journal())
    rt.handler("h")(lambda ctx, x: x)
    with pytest.raises(ValueError, match="reserved for runjournal's worker records"):
        rt.invoke("h", 1, invocation_id=WORKER_PREFIX + "sneaky")


def test_lease_and_worker_id_are_validated(one_journal: Opener) -> None:
    backend = one_journal()
    for bad in (0, -1, "soon"):
        with pytest.raises((ValueError, TypeError), match="lease"):
            Runtime(backend, lease=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="worker_id"):
        Runtime(backend, worker_id="")


# -- attach: one invocation, one runner ----------------------------------------------------


def test_a_second_worker_waits_for_the_first_and_returns_its_output(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    gate = Gate()
    first, second = runtimes(one_journal(), worker_id="a"), runtimes(one_journal(), worker_id="b")
    _gated_handler(first, gate)
    _gated_handler(second, gate)
    t1, out1 = _in_thread(lambda: first.invoke("h", invocation_id="inv"))
    assert gate.entered.wait(WAIT)
    t2, out2 = _in_thread(lambda: second.invoke("h", invocation_id="inv", timeout=WAIT))
    time.sleep(0.2)  # the second is waiting, not running
    assert gate.calls == 1 and not out2
    gate.opened.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert out1 == out2 == ["done|after"]
    assert gate.calls == 1


def test_two_threads_of_one_worker_run_an_id_once(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    gate = Gate()
    rt = runtimes(one_journal())
    _gated_handler(rt, gate)
    t1, out1 = _in_thread(lambda: rt.invoke("h", invocation_id="inv"))
    assert gate.entered.wait(WAIT)
    t2, out2 = _in_thread(lambda: rt.invoke("h", invocation_id="inv"))
    time.sleep(0.1)
    gate.opened.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert out1 == out2 == ["done|after"] and gate.calls == 1


def test_the_wait_for_another_worker_is_bounded_by_timeout(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    gate = Gate()
    first, second = runtimes(one_journal(), worker_id="a"), runtimes(one_journal(), worker_id="b")
    _gated_handler(first, gate)
    _gated_handler(second, gate)
    t1, out1 = _in_thread(lambda: first.invoke("h", invocation_id="inv"))
    assert gate.entered.wait(WAIT)
    started = time.monotonic()
    with pytest.raises(InvocationTimeout, match="still running on worker 'a'"):
        second.invoke("h", invocation_id="inv", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 5
    gate.opened.set()
    t1.join(WAIT)
    assert out1 == ["done|after"]
    assert second.invoke("h", invocation_id="inv") == "done|after"


# -- takeover and fencing ------------------------------------------------------------------


@attrs.define
class Unreachable:
    """Wraps a journal; while ``down``, writes to worker records fail (a stalled heartbeat)."""

    inner: JournalBackend
    down: bool = False

    @property
    def capabilities(self) -> Any:
        return self.inner.capabilities

    def _check(self, inv: Invocation) -> None:
        if self.down and inv.id.startswith(WORKER_PREFIX):
            raise TransientError("the journal cannot be reached")

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        self._check(invocation)
        return self.inner.create_invocation(invocation)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        self._check(invocation)
        return self.inner.update_invocation(invocation)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_worker_that_cannot_renew_loses_its_lease_and_starts_no_further_closure(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    """A's closure outlives its lease while its heartbeat cannot reach the journal;
    B takes the invocation over; A's next ctx operation raises LeaseLost."""
    stalled = Unreachable(one_journal())
    gate = Gate("from-a")
    after_calls: list[str] = []
    a = runtimes(stalled, worker_id="a", lease=0.4)  # type: ignore[arg-type]
    _gated_handler(a, gate, after_calls)
    stalled.down = True
    t1, out1 = _in_thread(lambda: a.invoke("h", invocation_id="inv"))
    assert gate.entered.wait(WAIT)
    time.sleep(0.6)  # A's lease expires: its heartbeat could not renew it

    b = runtimes(one_journal(), worker_id="b", lease=0.4)
    b_gate = Gate("from-b")
    b_gate.opened.set()
    _gated_handler(b, b_gate, after_calls)
    [result] = b.recover(timeout=WAIT)
    assert result.status is InvocationStatus.COMPLETED and result.output == "from-b|after"

    stalled.down = False
    gate.opened.set()  # A's closure returns, long after its lease
    t1.join(WAIT)
    # A's slow step was recorded by B first: A adopted nothing and started no closure;
    # its invoke attaches to B's outcome.
    assert out1 == ["from-b|after"]
    assert after_calls == ["after"]  # only B ran the step after
    stored = b.backend.get_invocation("inv")
    assert stored is not None and stored.lease is not None
    assert (stored.lease.owner, stored.lease.epoch) == ("b", 2)


def test_a_fenced_worker_raises_lease_lost_at_its_next_ctx_operation(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    """A stalls inside a step past its lease; B takes over and runs the same step,
    slowly. A's step returns first and is recorded; A's next ctx operation raises
    LeaseLost (no closure starts); B, the rightful owner, adopts A's recorded
    outcome when its own append meets it, and finishes."""
    stalled = Unreachable(one_journal())
    a_gate, b_gate = Gate("from-a"), Gate("from-b")
    raised: list[BaseException] = []
    later: list[str] = []
    a = runtimes(stalled, worker_id="a", lease=0.4)  # type: ignore[arg-type]

    @a.handler("h")
    def h(ctx: Context, _: Any) -> str:
        try:
            slow = ctx.run(a_gate, name="slow")
            return slow + ctx.run(lambda: later.append("a") or "!", name="next")
        except LeaseLost as exc:
            raised.append(exc)
            raise

    b = runtimes(one_journal(), worker_id="b", lease=0.4)
    b.handler("h")(
        lambda ctx, _: (
            ctx.run(b_gate, name="slow") + ctx.run(lambda: later.append("b") or "!", name="next")
        )
    )
    stalled.down = True
    t1, out1 = _in_thread(lambda: a.invoke("h", invocation_id="inv", timeout=WAIT))
    assert a_gate.entered.wait(WAIT)
    time.sleep(0.6)  # A's lease lapses: its heartbeat cannot reach the journal
    t2, out2 = _in_thread(lambda: b.recover(timeout=WAIT))
    assert b_gate.entered.wait(WAIT)  # B took over (fencing A) and runs the slow step too
    stalled.down = False
    a_gate.opened.set()  # A's closure returns first: its outcome is recorded
    deadline = time.monotonic() + WAIT
    while not raised and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raised and "lost its lease" in str(raised[0]) and "fenced" in str(raised[0])
    b_gate.opened.set()
    t1.join(WAIT)
    t2.join(WAIT)
    [result] = out2[0]
    assert result.status is InvocationStatus.COMPLETED and result.output == "from-a!"
    assert later == ["b"]  # A started no closure after losing its lease
    assert out1 == ["from-a!"]  # A's invoke returned the new owner's outcome
    assert [e.payload for e in b.backend.read_entries("inv")] == [b'"from-a"', b'"!"']


def test_a_crashed_workers_invocation_is_taken_once_its_lease_expires(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    """What a worker on another machine leaves when it dies after one step: a lease
    nobody renews. It is skipped while the lease holds, and taken after."""
    backend = one_journal()
    now = time.time()
    backend.create_invocation(
        make_invocation(
            "inv", handler="h", input=b"null", lease=Lease("elsewhere/1/x", 77, 1, now + 0.5)
        )
    )
    backend.append_entry("inv", make_entry(0, b'"one"', name="one"))
    b = runtimes(one_journal(), worker_id="b", lease=0.5)
    calls: list[str] = []

    @b.handler("h")
    def h(ctx: Context, _: Any) -> str:
        one = ctx.run(lambda: calls.append("one") or "x", name="one")
        return one + ctx.run(lambda: calls.append("two") or "two", name="two")

    [skipped] = b.recover()
    assert skipped.skipped is not None and "'elsewhere/1/x' holds it" in skipped.skipped
    assert b.status("inv") is InvocationStatus.PENDING
    time.sleep(0.6)
    [done] = b.recover()
    assert done.status is InvocationStatus.COMPLETED and done.output == "onetwo"
    assert calls == ["two"]
    stored = b.backend.get_invocation("inv")
    assert stored is not None and stored.lease is not None
    assert (stored.lease.owner, stored.lease.epoch) == ("b", 2)


def test_a_restarted_worker_takes_its_own_invocations_back_at_once(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    class Crash(BaseException):
        pass

    a = runtimes(one_journal(), worker_id="orders-1")

    @a.handler("h")
    def h(ctx: Context, _: Any) -> str:
        ctx.run(lambda: "one", name="one")
        raise Crash

    with pytest.raises(Crash):
        a.invoke("h", invocation_id="inv")
    restarted = runtimes(one_journal(), worker_id="orders-1")
    restarted.handler("h")(lambda ctx, _: ctx.run(lambda: "x", name="one") + "!")
    [done] = restarted.recover()
    assert done.output == "one!"


def test_a_handler_error_releases_the_lease_for_any_worker(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    a = runtimes(one_journal(), worker_id="a")

    @a.handler("h")
    def h(ctx: Context, _: Any) -> str:
        ctx.run(lambda: "one", name="one")
        raise RuntimeError("a dependency is down")

    with pytest.raises(RuntimeError):
        a.invoke("h", invocation_id="inv")
    b = runtimes(one_journal(), worker_id="b")
    b.handler("h")(lambda ctx, _: ctx.run(lambda: "x", name="one") + "!")
    [done] = b.recover()
    assert done.status is InvocationStatus.COMPLETED and done.output == "one!"


def test_close_ends_the_workers_leases_so_others_take_over_at_once(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    gate = Gate()
    a = runtimes(one_journal(), worker_id="a", lease=30)
    a.handler("h")(lambda ctx, _: ctx.run(gate, name="slow") + ctx.run(lambda: "?", name="next"))
    t1, out1 = _in_thread(lambda: a.invoke("h", invocation_id="inv"))
    assert gate.entered.wait(WAIT)
    closer, _ = _in_thread(a.close)
    time.sleep(0.1)
    gate.opened.set()
    closer.join(WAIT)
    t1.join(WAIT)
    assert isinstance(out1[0], LeaseLost) and "closing" in str(out1[0])
    b = runtimes(one_journal(), worker_id="b", lease=30)
    b.handler("h")(
        lambda ctx, _: ctx.run(lambda: "x", name="slow") + ctx.run(lambda: "!", name="next")
    )
    [done] = b.recover(timeout=WAIT)
    assert done.output == "done!"


# -- recovery --------------------------------------------------------------------------------


def test_recover_returns_at_its_timeout_and_the_rest_goes_on(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    seed = runtimes(one_journal(), worker_id="seed")

    @seed.handler("h")
    def fail(ctx: Context, n: int) -> int:
        raise RuntimeError("later")

    for n in range(3):
        with pytest.raises(RuntimeError):
            seed.invoke("h", n, invocation_id=f"inv-{n}")
    gate = Gate()
    rt = runtimes(one_journal(), worker_id="r")
    rt.handler("h")(lambda ctx, n: n if n else int(ctx.run(gate, name="slow") == "done"))
    started = time.monotonic()
    results = rt.recover(timeout=3)
    assert time.monotonic() - started < 8
    by_id = {r.invocation_id: r for r in results}
    assert by_id["inv-0"].running and by_id["inv-0"].status is InvocationStatus.PENDING
    assert by_id["inv-1"].output == 1 and by_id["inv-2"].output == 2
    gate.opened.set()
    deadline = time.monotonic() + WAIT
    while rt.status("inv-0") is not InvocationStatus.COMPLETED and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rt.status("inv-0") is InvocationStatus.COMPLETED


def test_start_recovery_finishes_orphans_without_anyone_calling_recover(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    class Crash(BaseException):
        pass

    a = runtimes(one_journal(), worker_id="a", lease=0.3)

    @a.handler("h")
    def h(ctx: Context, n: int) -> int:
        ctx.run(lambda: n, name="one")
        raise Crash

    for n in range(3):
        with pytest.raises(Crash):
            a.invoke("h", n, invocation_id=f"inv-{n}")
    b = runtimes(one_journal(), worker_id="b", lease=0.3)
    b.handler("h")(lambda ctx, n: ctx.run(lambda: -1, name="one") * 10)
    b.start_recovery(interval=0.05)
    b.start_recovery(interval=0.05)  # a second call changes nothing
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if all(b.status(f"inv-{n}") is InvocationStatus.COMPLETED for n in range(3)):
            break
        time.sleep(0.05)
    assert [b.invoke("h", n, invocation_id=f"inv-{n}") for n in range(3)] == [0, 10, 20]


def test_worker_records_are_not_invocations(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    gate = Gate()
    rt = runtimes(one_journal(), worker_id="w", lease=0.3)
    _gated_handler(rt, gate)
    t1, _ = _in_thread(lambda: rt.invoke("h", invocation_id="inv"))
    assert gate.entered.wait(WAIT)
    time.sleep(0.3)  # the heartbeat writes the liveness record
    gate.opened.set()
    t1.join(WAIT)
    ids = list(rt.backend.list_invocations())
    assert "inv" in ids and WORKER_PREFIX + "w" in ids
    record = rt.backend.get_invocation(WORKER_PREFIX + "w")
    assert record is not None and is_worker_record(record)
    assert record.status is InvocationStatus.COMPLETED
    assert rt.recover() == []  # never recovered, never resumed


def test_terminal_failures_are_reported_by_recover(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    seed = runtimes(one_journal(), worker_id="seed")
    seed.handler("h")(lambda ctx, _: (_ for _ in ()).throw(RuntimeError("later")))
    with pytest.raises(RuntimeError):
        seed.invoke("h", invocation_id="inv")
    rt = runtimes(one_journal())

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        raise TerminalError("no")

    [result] = rt.recover()
    assert result.status is InvocationStatus.FAILED and isinstance(result.error, TerminalError)


# -- journals written by runjournal 0.1 ------------------------------------------------------

V1_JOURNAL = Path(__file__).parent / "data" / "v1-lmdb"


def test_a_journal_written_by_version_1_opens_and_resumes(tmp_path: Path) -> None:
    """tests/data/v1-lmdb was written by runjournal 0.1 (record format 1): a completed,
    a failed and a pending invocation (two steps and a wait_first journaled)."""
    from runjournal.backends.lmdb import LMDBBackend

    path = tmp_path / "journal"
    path.mkdir()
    shutil.copy(V1_JOURNAL / "data.mdb", path / "data.mdb")
    calls: list[str] = []
    with LMDBBackend.open(path) as backend, Runtime(backend) as rt:

        @rt.handler("orders.process")
        def process(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
            a = ctx.run(lambda: calls.append("reserve") or "again", name="reserve")
            fut = ctx.run_async(lambda: calls.append("charge") or "again", name="charge")
            winner = ctx.wait_first(fut)
            s = ctx.run(lambda: calls.append("ship") or f"shipped-{order['id']}", name="ship")
            return {"reserve": a, "charge": winner.result(), "ship": s}

        @rt.handler("orders.refund")
        def refund(ctx: Context, order: Any) -> None:
            raise AssertionError("a failed invocation is not run again")

        assert rt.invoke("orders.process", {"id": 1}, invocation_id="order-done") == {
            "charge": "charged-1",
            "reserve": "reserved-1",
            "ship": "shipped-1",
        }
        with pytest.raises(TerminalError, match="refund refused"):
            rt.invoke("orders.refund", {"id": 3}, invocation_id="refund-failed")
        [result] = rt.recover()
        assert result.invocation_id == "order-pending"
        assert result.output == {
            "charge": "charged-2",
            "reserve": "reserved-2",
            "ship": "shipped-2",
        }
        assert calls == ["ship"]
        stored = backend.get_invocation("order-pending")
        assert stored is not None and stored.lease is not None  # written back in format 2
