"""asyncio handlers (issue 12): AsyncContext, ainvoke / arecover, cancellation, the event loop.

Coroutines are driven with ``asyncio.run`` inside plain tests, each bounded by
``asyncio.wait_for`` (and every gate by a timeout) so a bug fails instead of hanging.
Completion orders are forced with events and by awaiting futures, not with sleeps. A
crash is a ``BaseException`` subclass raised by the handler: the attempt stops as a
dying process would (nothing settled, the lease not handed back) and the replay runs on
another Runtime over the same journal, read back from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from runjournal import Context, InvocationStatus, InvocationTimeout, Runtime, TerminalError
from runjournal.backends import MemoryBackend
from runjournal.context import (
    AsyncContext,
    AsyncRunFuture,
    ContextMisuseError,
    NonDeterminismError,
    set_testing,
)
from runjournal.journal import CodecError, EntryKind, JournalBackend
from tests.conftest import FakeClock

T = TypeVar("T")

WAIT = 10.0  # the bound of every wait: a bug fails the test instead of hanging it

Opener = Callable[[], JournalBackend]

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


class Crash(BaseException):
    """The process dying here: not an Exception, so nothing handles it on the way out."""


class Declined(TerminalError):
    pass


def drive(work: Awaitable[T], timeout: float = WAIT) -> T:
    """Run ``work`` on a new event loop, failing (not hanging) after ``timeout``."""

    async def bounded() -> T:
        return await asyncio.wait_for(work, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def runtimes() -> Iterator[Callable[..., Runtime]]:
    """Builds Runtimes; closes them afterwards."""
    made: list[Runtime] = []

    def make(backend: JournalBackend | str, **kwargs: Any) -> Runtime:
        runtime = Runtime(backend, **kwargs)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
def rt(runtimes: Callable[..., Runtime], backend: MemoryBackend, clock: FakeClock) -> Runtime:
    return runtimes(backend, clock=clock)


def journal(backend: JournalBackend, invocation_id: str) -> list[tuple[Any, ...]]:
    """An invocation's entries, as comparable tuples (everything but the timestamp)."""
    return [
        (e.index, e.kind, e.name, e.payload, e.codec, e.failure, e.attempts)
        for e in backend.read_entries(invocation_id)
    ]


def names(backend: JournalBackend, invocation_id: str) -> list[tuple[int, str | None]]:
    return [(e.index, e.name) for e in backend.read_entries(invocation_id)]


def decision(backend: JournalBackend, invocation_id: str, index: int) -> tuple[EntryKind, Any]:
    [entry] = [e for e in backend.read_entries(invocation_id) if e.index == index]
    assert entry.payload is not None
    return entry.kind, json.loads(entry.payload)


def gated(name: str, gates: dict[str, asyncio.Event]) -> Callable[[], Coroutine[Any, Any, str]]:
    """A coroutine closure that counts its call, waits for its gate, returns NAME."""

    async def fn() -> str:
        calls[name] += 1
        await asyncio.wait_for(gates[name].wait(), WAIT)
        return name.upper()

    return fn


def thread_gated(name: str, gates: dict[str, threading.Event]) -> Callable[[], str]:
    """The same as a plain closure (it runs in a worker thread)."""

    def fn() -> str:
        calls[name] += 1
        assert gates[name].wait(WAIT), f"gate {name!r} never opened"
        return name.upper()

    return fn


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` off the loop until it holds (bounded)."""
    deadline = time.monotonic() + WAIT
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


class Ticker:
    """A task waking every 5 ms; records the longest gap between two wake-ups.

    A gap much longer than 5 ms means something blocked the event loop.
    """

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.last = 0.0
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ticker:
        self.last = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0.02)
        return self

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.gaps.append(now - self.last)
            self.last = now

    async def __aexit__(self, *exc_info: object) -> None:
        self.gaps.append(time.monotonic() - self.last)  # a loop blocked up to here counts
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    @property
    def max_gap(self) -> float:
        return max(self.gaps)


# -- every operation, then a replay, on every engine ------------------------------------


async def _price(qty: int) -> int:
    await asyncio.sleep(0)
    return qty * 3


def _every_operation(plan: dict[str, Any], seen: list[dict[str, Any]]) -> Any:
    async def handler(ctx: AsyncContext, order: dict[str, Any]) -> dict[str, Any]:
        seen_replaying = ctx.is_replaying()

        async def price() -> int:  # a coroutine closure: runs on the loop
            calls["price"] += 1
            return await _price(order["qty"])

        def stock() -> dict[str, Any]:  # a plain closure: a worker thread
            calls["stock"] += 1
            assert threading.current_thread() is not loop_thread
            return {"left": (7, 8)}

        def discount() -> Awaitable[int]:  # a plain function returning an awaitable
            calls["discount"] += 1
            return _price(1)

        loop_thread = threading.current_thread()
        out: dict[str, Any] = {"price": await ctx.run(price, name="price")}
        out["stock"] = await ctx.run(stock, name="stock")
        out["discount"] = await ctx.run(discount, name="discount")
        out["void"] = await ctx.run_void(lambda: calls.update(["log"]) or "dropped", name="log")

        # gather: indexes are taken when ctx.run is called, whatever finishes first.
        fast_done = asyncio.Event()

        async def slow() -> str:
            calls["slow"] += 1
            await asyncio.wait_for(fast_done.wait(), WAIT)  # finishes after "fast"
            return "SLOW"

        def fast() -> str:
            calls["fast"] += 1
            return "FAST"

        async def fast_then_signal() -> str:
            value = await asyncio.to_thread(fast)
            fast_done.set()
            return value

        out["gather"] = await asyncio.gather(
            ctx.run(slow, name="slow"), ctx.run(fast_then_signal, name="fast")
        )

        # futures: a coroutine one and a plain one; "mail" is durable first.
        crm_gate = asyncio.Event()

        async def crm() -> str:
            calls["crm"] += 1
            await asyncio.wait_for(crm_gate.wait(), WAIT)
            return "CRM"

        crm_fut = ctx.run_async(crm, name="crm")
        mail_fut = ctx.run_async(lambda: calls.update(["mail"]) or "MAIL", name="mail")
        assert isinstance(crm_fut, AsyncRunFuture)
        out["mail"] = await mail_fut
        crm_gate.set()
        first = await ctx.wait_first(crm_fut, mail_fut)
        out["first"] = first.name
        out["order"] = [f.name async for f in ctx.wait(crm_fut, mail_fut)]
        out["values"] = [await crm_fut, await mail_fut]
        out["done"] = [crm_fut.done(), mail_fut.done()]
        seen.append({**out, "replaying": seen_replaying})
        if plan["crash"]:
            raise Crash
        return out

    return handler


def test_every_operation_journals_once_and_replays_the_same_values(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    plan = {"crash": True}
    seen: list[dict[str, Any]] = []
    handler = _every_operation(plan, seen)
    first = runtimes(one_journal(), worker_id="a")
    first.handler("orders")(handler)
    with pytest.raises(Crash):
        drive(first.ainvoke("orders", {"qty": 2}, invocation_id="o-1"))
    once = {n: 1 for n in ["price", "stock", "discount", "log", "slow", "fast", "crm", "mail"]}
    assert calls == once
    expected = {
        "price": 6,
        "stock": {"left": [7, 8]},  # the value decoded from the journal, the first time too
        "discount": 3,
        "void": None,
        "gather": ["SLOW", "FAST"],
        "mail": "MAIL",
        "first": "mail",
        "order": ["mail", "crm"],
        "values": ["CRM", "MAIL"],
        "done": [True, True],
    }
    assert seen == [{**expected, "replaying": False}]
    assert names(first.backend, "o-1") == [
        (0, "price"),
        (1, "stock"),
        (2, "discount"),
        (3, "log"),
        (4, "slow"),  # its index was taken first, though "fast" finished first
        (5, "fast"),
        (6, "crm"),
        (7, "mail"),
        (8, None),
        (9, None),
    ]
    assert decision(first.backend, "o-1", 8) == (EntryKind.WAIT_FIRST, {"of": [6, 7], "winner": 7})
    assert decision(first.backend, "o-1", 9) == (EntryKind.WAIT, {"of": [6, 7], "order": [7, 6]})
    assert first.status("o-1") is InvocationStatus.PENDING

    # Another worker replays it from the engine: nothing runs again, same values.
    plan["crash"] = False
    replay = runtimes(one_journal(), worker_id="b")
    replay.handler("orders")(handler)
    assert drive(replay.ainvoke("orders", {"qty": 2}, invocation_id="o-1")) == expected
    assert seen[1] == {**expected, "replaying": True}
    assert calls == once
    assert replay.status("o-1") is InvocationStatus.COMPLETED
    # Completed: its stored output, without running the handler.
    assert drive(replay.ainvoke("orders", {"qty": 2}, invocation_id="o-1")) == expected
    assert len(seen) == 2


def test_run_void_runs_what_it_is_given_and_keeps_no_value(rt: Runtime) -> None:
    """A coroutine function, a plain one, and a plain one returning a coroutine (as
    `lambda: send(x)`, which ctx.run awaits too): each runs once, journaled as null."""

    async def send(what: str) -> str:
        await asyncio.sleep(0)
        calls[what] += 1
        return "dropped"

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> list[Any]:
        return [
            await ctx.run_void(functools.partial(send, "coroutine"), name="coroutine"),
            await ctx.run_void(lambda: calls.update(["plain"]) or "dropped", name="plain"),
            await ctx.run_void(lambda: send("returned"), name="returned"),
        ]

    assert drive(rt.ainvoke("h", invocation_id="x")) == [None, None, None]
    assert calls == {"coroutine": 1, "plain": 1, "returned": 1}
    assert [e.payload for e in rt.backend.read_entries("x")] == [b"null"] * 3
    assert drive(rt.ainvoke("h", invocation_id="x")) == [None, None, None]
    assert calls == {"coroutine": 1, "plain": 1, "returned": 1}


# -- wait_first and wait replay their journaled decisions ----------------------------


def test_wait_first_winner_replays_though_timings_reverse(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    """Attempt 1: c, then a, are durable; b hangs; wait_first picks c; the process dies.
    The replay: b now finishes first (a and c are journaled); c must still win."""
    plan = {"release": "ca"}
    seen: list[str | None] = []

    async def handler(ctx: AsyncContext, _: Any) -> list[Any]:
        gates = {n: asyncio.Event() for n in "abc"}
        futs = {n: ctx.run_async(gated(n, gates), name=n) for n in "abc"}
        for n in plan["release"]:  # force the completion order
            gates[n].set()
            await futs[n]
        first = await ctx.wait_first(futs["a"], futs["b"], futs["c"])
        seen.append(first.name)
        if len(seen) == 1:
            raise Crash  # b still runs: its task is abandoned, nothing journaled
        for gate in gates.values():
            gate.set()
        return [first.name, await first, await futs["b"]]

    first_rt = runtimes(one_journal(), worker_id="a")
    first_rt.handler("h")(handler)
    with pytest.raises(Crash):
        drive(first_rt.ainvoke("h", invocation_id="x"))
    assert names(first_rt.backend, "x") == [(0, "a"), (2, "c"), (3, None)]
    assert decision(first_rt.backend, "x", 3) == (
        EntryKind.WAIT_FIRST,
        {"of": [0, 1, 2], "winner": 2},
    )

    calls.clear()
    plan["release"] = "bac"  # reversed: b is durable before wait_first is called
    replay = runtimes(one_journal(), worker_id="b")
    replay.handler("h")(handler)
    assert drive(replay.ainvoke("h", invocation_id="x")) == ["c", "C", "B"]
    assert seen == ["c", "c"]
    assert calls == {"b": 1}  # only the unfinished future ran again
    assert replay.status("x") is InvocationStatus.COMPLETED


def test_wait_order_replays_unchanged_though_timings_reverse(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    plan = {"release": "cab"}
    seen: list[list[str | None]] = []

    async def handler(ctx: AsyncContext, _: Any) -> list[Any]:
        gates = {n: asyncio.Event() for n in "ac"}
        b_gate = {"b": threading.Event()}  # b is a plain closure, in a worker thread
        futs = {n: ctx.run_async(gated(n, gates), name=n) for n in "ac"}
        futs["b"] = ctx.run_async(thread_gated("b", b_gate), name="b")
        futs = {n: futs[n] for n in "abc"}  # indexes: a 0, c 1, b 2
        for n in plan["release"]:
            (b_gate if n == "b" else gates)[n].set()
            await futs[n]
        order = [f.name async for f in ctx.wait(*futs.values())]
        seen.append(order)
        if len(seen) == 1:
            raise Crash
        return [order, [await f for f in futs.values()]]

    first_rt = runtimes(one_journal(), worker_id="a")
    first_rt.handler("h")(handler)
    with pytest.raises(Crash):
        drive(first_rt.ainvoke("h", invocation_id="x"))
    assert decision(first_rt.backend, "x", 3) == (
        EntryKind.WAIT,
        {"of": [0, 1, 2], "order": [1, 0, 2]},
    )
    plan["release"] = "bac"  # every outcome is journaled now; reversed timings anyway
    replay = runtimes(one_journal(), worker_id="b")
    replay.handler("h")(handler)
    assert drive(replay.ainvoke("h", invocation_id="x")) == [["c", "a", "b"], ["A", "B", "C"]]
    assert seen == [["c", "a", "b"], ["c", "a", "b"]]
    assert calls == {"a": 1, "b": 1, "c": 1}


def test_a_decision_among_other_futures_raises_non_determinism(rt: Runtime) -> None:
    plan = {"members": "ab"}

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> None:
        futs = {n: ctx.run_async(lambda n=n: n, name=n) for n in "ab"}
        await ctx.wait_first(*(futs[n] for n in plan["members"]))
        raise RuntimeError("later")

    with pytest.raises(RuntimeError):
        drive(rt.ainvoke("h", invocation_id="x"))
    plan["members"] = "a"
    with pytest.raises(NonDeterminismError) as info:
        drive(rt.ainvoke("h", invocation_id="x"))
    assert info.value.index == 2
    assert "[0, 1]" in str(info.value) and "[0]" in str(info.value)


def test_a_renamed_step_raises_non_determinism(rt: Runtime) -> None:
    plan = {"name": "a"}

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> None:
        await ctx.run(lambda: 1, name=plan["name"])
        raise RuntimeError("later")

    with pytest.raises(RuntimeError):
        drive(rt.ainvoke("h", invocation_id="x"))
    plan["name"] = "b"
    with pytest.raises(NonDeterminismError, match=r"index 0.*run 'a'.*run 'b'"):
        drive(rt.ainvoke("h", invocation_id="x"))


@pytest.mark.parametrize("started_in", ["create_task", "gather"])
def test_the_invocation_completes_only_once_steps_running_in_other_tasks_are_journaled(
    rt: Runtime, started_in: str
) -> None:
    """As with futures: a step still running when the handler returns (a task it
    started, or a gather it left after another member failed) is journaled before the
    invocation completes; a completed invocation is never replayed, so it would be lost."""

    async def slow() -> str:
        calls["slow"] += 1
        await asyncio.sleep(0.2)
        return "SLOW"

    async def boom() -> None:
        raise Declined("no")

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        if started_in == "create_task":
            task = asyncio.get_running_loop().create_task(ctx.run(slow, name="slow"))
            await asyncio.sleep(0)  # it has started
            assert not task.done()
            return "ok"
        try:
            await asyncio.gather(ctx.run(boom, name="boom"), ctx.run(slow, name="slow"))
        except Declined:
            return "ok"
        return "unreachable"

    assert drive(rt.ainvoke("h", invocation_id="x")) == "ok"
    assert rt.status("x") is InvocationStatus.COMPLETED
    expected = ["slow"] if started_in == "create_task" else ["boom", "slow"]
    assert [name for _, name in names(rt.backend, "x")] == expected
    assert calls == {"slow": 1}


# -- sync and async workers share the journal --------------------------------------------


def _sync_logic(plan: dict[str, str]) -> Callable[[Context, Any], Any]:
    def handler(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        price = ctx.run(lambda: calls.update(["price"]) or order["qty"] * 3, name="price")
        ctx.run_void(lambda: calls.update(["log"]), name="log")
        a = ctx.run_async(lambda: calls.update(["a"]) or "A", name="a")
        a.result()  # a is durable before b starts: one completion order
        b = ctx.run_async(lambda: calls.update(["b"]) or "B", name="b")
        b.result()
        first = ctx.wait_first(b, a)
        order_ = [f.result() for f in ctx.wait(b, a)]
        if plan["crash"] == "sync":
            raise Crash
        try:
            ctx.run(lambda: _decline(), name="charge")
        except Declined as exc:
            declined = str(exc)
        total = ctx.run(lambda: calls.update(["total"]) or price + 1, name="total")
        return {"first": first.result(), "order": order_, "declined": declined, "total": total}

    return handler


def _decline() -> None:
    calls["charge"] += 1
    raise Declined("card declined")


def _async_logic(plan: dict[str, str]) -> Callable[[AsyncContext, Any], Any]:
    async def handler(ctx: AsyncContext, order: dict[str, Any]) -> dict[str, Any]:
        async def price() -> int:
            calls["price"] += 1
            return order["qty"] * 3

        value = await ctx.run(price, name="price")
        await ctx.run_void(lambda: calls.update(["log"]), name="log")
        a = ctx.run_async(lambda: calls.update(["a"]) or "A", name="a")
        await a
        b = ctx.run_async(lambda: calls.update(["b"]) or "B", name="b")
        await b
        first = await ctx.wait_first(b, a)
        order_ = [await f async for f in ctx.wait(b, a)]
        if plan["crash"] == "async":
            raise Crash
        try:
            await ctx.run(_decline, name="charge")
        except Declined as exc:
            declined = str(exc)
        total = await ctx.run(lambda: calls.update(["total"]) or value + 1, name="total")
        return {"first": await first, "order": order_, "declined": declined, "total": total}

    return handler


@pytest.mark.parametrize("started_by", ["sync", "async"])
def test_an_invocation_started_in_one_mode_finishes_in_the_other_with_the_same_journal(
    one_journal: Opener, runtimes: Callable[..., Runtime], started_by: str
) -> None:
    plan = {"crash": ""}
    sync_rt = runtimes(one_journal(), worker_id="sync")
    async_rt = runtimes(one_journal(), worker_id="async")
    sync_rt.handler("orders")(_sync_logic(plan))
    async_rt.handler("orders")(_async_logic(plan))
    order = {"qty": 2}
    expected = {"first": "A", "order": ["A", "B"], "declined": "card declined", "total": 7}
    everything = {n: 1 for n in ["price", "log", "a", "b", "charge", "total"]}

    # References: the same logic run whole by each mode journals the same entries.
    assert sync_rt.invoke("orders", order, invocation_id="ref-sync") == expected
    assert drive(async_rt.ainvoke("orders", order, invocation_id="ref-async")) == expected
    reference = journal(sync_rt.backend, "ref-sync")
    assert journal(async_rt.backend, "ref-async") == reference
    assert len(reference) == 8

    calls.clear()
    plan["crash"] = started_by

    def start() -> Any:
        if started_by == "sync":
            return sync_rt.invoke("orders", order, invocation_id="x")
        return drive(async_rt.ainvoke("orders", order, invocation_id="x"))

    with pytest.raises(Crash):
        start()
    assert journal(sync_rt.backend, "x") == reference[:6]
    plan["crash"] = ""
    if started_by == "sync":
        assert drive(async_rt.ainvoke("orders", order, invocation_id="x")) == expected
    else:
        assert sync_rt.invoke("orders", order, invocation_id="x") == expected
    assert calls == everything  # the steps the first mode journaled did not run again
    assert journal(async_rt.backend, "x") == reference
    # Either mode reads the other's outcome.
    assert sync_rt.invoke("orders", order, invocation_id="x") == expected
    assert drive(async_rt.ainvoke("orders", order, invocation_id="x")) == expected
    assert calls == everything


# -- sync callers of async handlers, async callers of sync handlers -------------------------


def test_sync_invoke_and_recover_run_an_async_handler_on_the_runtimes_loop(rt: Runtime) -> None:
    where: list[str] = []
    plan = {"fail": True}

    @rt.handler("h")
    async def h(ctx: AsyncContext, x: int) -> int:
        where.append(threading.current_thread().name)
        value: int = await ctx.run(lambda: calls.update(["inc"]) or x + 1, name="inc")
        if plan["fail"] and x == 2:
            raise RuntimeError("pending for recover()")
        return value

    assert rt.invoke("h", 1, invocation_id="x") == 2
    assert rt.invoke("h", 1, invocation_id="x") == 2  # completed: not run again
    assert len(where) == 1 and where[0].startswith("runjournal-loop-")
    assert where[0] != threading.current_thread().name
    with pytest.raises(RuntimeError, match="pending for recover"):
        rt.invoke("h", 2, invocation_id="y")
    plan["fail"] = False
    [result] = rt.recover(timeout=WAIT)
    assert (result.invocation_id, result.status, result.output) == (
        "y",
        InvocationStatus.COMPLETED,
        3,
    )
    assert calls == {"inc": 2}


def test_sync_invoke_of_an_async_handler_inside_a_running_loop_warns_and_still_works(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, x: int) -> int:
        return await ctx.run(lambda: x * 2, name="double")

    async def main() -> int:
        return rt.invoke("h", 4, invocation_id="x")  # blocks this loop: it warns

    with caplog.at_level(logging.WARNING, logger="runjournal"):
        assert drive(main()) == 8
    assert any("await rt.ainvoke" in r.getMessage() for r in caplog.records)


def test_ainvoke_runs_a_sync_handler_in_a_worker_thread_without_blocking_the_loop(
    rt: Runtime,
) -> None:
    where: list[int] = []

    @rt.handler("h")
    def h(ctx: Context, x: int) -> int:
        where.append(threading.get_ident())
        time.sleep(0.2)  # blocking, in the handler itself
        return ctx.run(lambda: time.sleep(0.1) or x + 1, name="inc")

    async def main() -> tuple[int, float]:
        async with Ticker() as ticker:
            out = await rt.ainvoke("h", 1, invocation_id="x")
        return out, ticker.max_gap

    out, gap = drive(main())
    assert out == 2
    assert where and where[0] != threading.get_ident()
    assert gap < 0.1, f"the loop stalled {gap:.3f} s while a sync handler ran"
    assert drive(rt.ainvoke("h", 1, invocation_id="x")) == 2 and len(where) == 1


# -- arecover -------------------------------------------------------------------------------


def test_arecover_completes_pending_invocations_and_reports_slow_ones_running(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    seed = runtimes(one_journal(), worker_id="seed")

    @seed.handler("h")
    async def fail(ctx: AsyncContext, n: int) -> int:
        await ctx.run(lambda: calls.update([f"first-{n}"]) or n, name="first")
        raise RuntimeError("later")

    async def seed_all() -> None:
        for n in range(3):
            with pytest.raises(RuntimeError):
                await seed.ainvoke("h", n, invocation_id=f"inv-{n}")

    drive(seed_all())
    rt = runtimes(one_journal(), worker_id="r")

    async def main() -> None:
        gate = asyncio.Event()

        @rt.handler("h")
        async def h(ctx: AsyncContext, n: int) -> int:
            first: int = await ctx.run(lambda: calls.update(["again"]) or -1, name="first")
            if n == 0:

                async def slow() -> int:
                    await asyncio.wait_for(gate.wait(), WAIT)
                    return 100

                return first + await ctx.run(slow, name="slow")
            return first * 10

        started = time.monotonic()
        results = await rt.arecover(timeout=2.0)  # ample for the quick ones, on any engine
        assert 2.0 <= time.monotonic() - started < 5
        by_id = {r.invocation_id: r for r in results}
        assert all(r.error is None and r.skipped is None for r in results), results
        assert sorted(by_id) == ["inv-0", "inv-1", "inv-2"]
        assert by_id["inv-0"].running and by_id["inv-0"].status is InvocationStatus.PENDING
        assert (by_id["inv-1"].status, by_id["inv-1"].output) == (InvocationStatus.COMPLETED, 10)
        assert by_id["inv-2"].output == 20
        gate.set()  # the slow one goes on as a task of this loop
        await eventually(lambda: rt.status("inv-0") is InvocationStatus.COMPLETED, "inv-0 done")
        assert await rt.ainvoke("h", 0, invocation_id="inv-0") == 100

    drive(main())
    assert "again" not in calls  # every "first" step was replayed


def test_start_recovery_inside_a_loop_is_a_task_of_that_loop(rt: Runtime) -> None:
    loops: list[Any] = []
    plan = {"fail": True}

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        loops.append(asyncio.get_running_loop())
        if plan["fail"]:
            raise RuntimeError("later")
        return await ctx.run(lambda: "done", name="s")

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await rt.ainvoke("h", invocation_id="x")
        plan["fail"] = False
        rt.start_recovery(interval=0.05)
        await eventually(lambda: rt.status("x") is InvocationStatus.COMPLETED, "recovered")
        assert loops == [asyncio.get_running_loop()] * 2
        await rt.aclose()

    drive(main())


# -- cancellation --------------------------------------------------------------------------


@pytest.mark.parametrize("closure", ["coroutine", "thread", "future"])
def test_a_cancelled_invocation_journals_nothing_half_done_and_arecover_completes_it(
    one_journal: Opener, runtimes: Callable[..., Runtime], closure: str
) -> None:
    """Cancelling the task running ainvoke while a step runs: a coroutine closure is
    cancelled; a plain one in a thread runs on, and its result is dropped. The lease is
    handed back, and another worker's arecover() completes the invocation."""
    phase = {"first": True}
    entered = threading.Event()
    release = threading.Event()
    returned = threading.Event()
    cancelled: list[str] = []

    async def slow_coroutine() -> str:
        calls["slow"] += 1
        if not phase["first"]:
            return "SLOW"
        entered.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise
        return "LATE"

    def slow_thread() -> str:
        calls["slow"] += 1
        if not phase["first"]:
            return "SLOW"
        entered.set()
        assert release.wait(WAIT)
        returned.set()
        return "LATE"

    async def handler(ctx: AsyncContext, _: Any) -> str:
        one: str = await ctx.run(lambda: calls.update(["one"]) or "ONE", name="one")
        if closure == "future":
            fut = ctx.run_async(slow_coroutine, name="slow")
            return one + await fut
        fn = slow_coroutine if closure == "coroutine" else slow_thread
        return one + await ctx.run(fn, name="slow")

    a = runtimes(one_journal(), worker_id="a")
    a.handler("h")(handler)

    async def cancel_mid_step() -> None:
        task = asyncio.get_running_loop().create_task(a.ainvoke("h", invocation_id="x"))
        assert await asyncio.to_thread(entered.wait, WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if closure == "thread":
            release.set()  # the thread's closure returns now, after the cancellation
            assert await asyncio.to_thread(returned.wait, WAIT)
            await asyncio.sleep(0.2)  # time for its result to be (wrongly) journaled
        backend = a.backend

        def released() -> bool:
            stored = backend.get_invocation("x")
            assert stored is not None and stored.lease is not None
            return stored.lease.expires_at == 0.0

        await eventually(released, "the lease handed back")

    drive(cancel_mid_step())
    assert cancelled == ([] if closure == "thread" else ["slow"])
    assert names(a.backend, "x") == [(0, "one")]
    assert a.status("x") is InvocationStatus.PENDING

    phase["first"] = False
    b = runtimes(one_journal(), worker_id="b")
    b.handler("h")(handler)
    [result] = drive(b.arecover(timeout=WAIT))
    assert (result.status, result.output) == (InvocationStatus.COMPLETED, "ONESLOW")
    assert calls == {"one": 1, "slow": 2}
    assert [e.payload for e in b.backend.read_entries("x")] == [b'"ONE"', b'"SLOW"']


def _timeout_forms() -> list[Any]:
    forms: list[Any] = [pytest.param("wait_for")]
    forms.append(
        pytest.param(
            "timeout",
            marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout: 3.11+"),
        )
    )
    return forms


async def _with_timeout(form: str, work: Coroutine[Any, Any, T], seconds: float) -> T:
    if form == "wait_for":
        return await asyncio.wait_for(work, seconds)
    async with asyncio.timeout(seconds):
        return await work


@pytest.mark.parametrize("form", _timeout_forms())
@pytest.mark.parametrize("handler_does", ["raise", "go-on", "return"])
def test_a_timeout_around_a_step_ends_the_attempt_and_leaves_it_pending(
    rt: Runtime, form: str, handler_does: str
) -> None:
    """The timeout cancels the step: nothing is journaled for it. A handler that lets
    the timeout out fails with it; one that swallows it and calls ctx again gets
    ContextMisuseError there; one that swallows it and returns gets ContextMisuseError
    from ainvoke. Each way the invocation stays pending, and arecover() completes it."""
    phase = {"first": True}
    seen: list[BaseException] = []

    async def slow() -> str:
        calls["slow"] += 1
        if phase["first"]:
            await asyncio.sleep(WAIT)
        return "SLOW"

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        one: str = await ctx.run(lambda: "ONE", name="one")
        try:
            slow_value = await _with_timeout(form, ctx.run(slow, name="slow"), 0.05)
        except asyncio.TimeoutError as exc:
            seen.append(exc)
            if handler_does == "raise":
                raise
            if handler_does == "return":
                return "gave up"
            try:
                await ctx.run(lambda: calls.update(["after"]), name="after")
            except ContextMisuseError as misuse:
                seen.append(misuse)
                raise
        return one + slow_value

    if handler_does == "raise":
        with pytest.raises(asyncio.TimeoutError):
            drive(rt.ainvoke("h", invocation_id="x"))
    else:
        with pytest.raises(ContextMisuseError, match="index 1.*cancelled"):
            drive(rt.ainvoke("h", invocation_id="x"))
    if handler_does == "go-on":
        assert isinstance(seen[1], ContextMisuseError)
        assert "after the step at index 1" in str(seen[1]) and "arecover()" in str(seen[1])
    assert "after" not in calls
    assert names(rt.backend, "x") == [(0, "one")]
    assert rt.status("x") is InvocationStatus.PENDING

    phase["first"] = False
    [result] = drive(rt.arecover(timeout=WAIT))
    assert (result.status, result.output) == (InvocationStatus.COMPLETED, "ONESLOW")
    assert calls["slow"] == 2


# -- the event loop is never blocked ---------------------------------------------------------


def test_the_ticker_sees_a_blocked_loop() -> None:
    """The check below is sound: blocking the loop for 0.2 s shows as a gap."""

    async def main() -> float:
        async with Ticker() as ticker:
            time.sleep(0.2)
        return ticker.max_gap

    assert drive(main()) >= 0.15


def test_the_loop_ticks_while_a_plain_closure_sleeps(rt: Runtime) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        return await ctx.run(lambda: time.sleep(0.3) or "slept", name="sleep")

    async def main() -> tuple[str, float, float]:
        async with Ticker() as ticker:
            started = time.monotonic()
            out = await rt.ainvoke("h", invocation_id="x")
            elapsed = time.monotonic() - started
        return out, elapsed, ticker.max_gap

    out, elapsed, gap = drive(main())
    assert out == "slept" and elapsed >= 0.3
    assert gap < 0.1, f"the loop stalled {gap:.3f} s while a closure slept 0.3 s"


def test_the_loop_ticks_while_lmdb_commits_many_steps(
    runtimes: Callable[..., Runtime], tmp_path: Any
) -> None:
    pytest.importorskip("runjournal.backends.lmdb")
    rt = runtimes(f"lmdb://{tmp_path / 'journal'}")  # the Runtime opens and closes it
    backend = rt.backend
    assert backend.durable  # every commit is synced to disk

    @rt.handler("many")
    async def many(ctx: AsyncContext, n: int) -> int:
        total = 0
        for i in range(n):
            total += await ctx.run(lambda i=i: i, name=f"s{i}")
        return total

    async def main() -> tuple[list[int], float, float]:
        async with Ticker() as ticker:
            started = time.monotonic()
            out = await asyncio.gather(
                rt.ainvoke("many", 600, invocation_id="long"),
                *(rt.ainvoke("many", 40, invocation_id=f"short-{i}") for i in range(10)),
            )
            elapsed = time.monotonic() - started
        return out, elapsed, ticker.max_gap

    out, elapsed, gap = drive(main(), timeout=30)
    assert out == [sum(range(600))] + [sum(range(40))] * 10
    assert len(backend.read_entries("long")) == 600
    assert gap < 0.1, f"the loop stalled {gap:.3f} s while LMDB committed ({elapsed:.2f} s)"
    assert gap < elapsed / 3


def test_retry_backoff_sleeps_on_the_loop_without_blocking_it(rt: Runtime) -> None:
    runtime = Runtime(rt.backend)  # the real clock: backoff is asyncio.sleep
    try:

        @runtime.handler("h")
        async def h(ctx: AsyncContext, _: Any) -> str:
            async def flaky() -> str:
                calls["flaky"] += 1
                if calls["flaky"] <= 2:
                    raise ConnectionError("try later")
                return "ok"

            return await ctx.run(flaky, name="flaky", initial_retry_interval=0.1)

        async def main() -> tuple[str, float, float]:
            async with Ticker() as ticker:
                started = time.monotonic()
                out = await runtime.ainvoke("h", invocation_id="x")
                elapsed = time.monotonic() - started
            return out, elapsed, ticker.max_gap

        out, elapsed, gap = drive(main())
    finally:
        runtime.close()
    assert out == "ok" and calls == {"flaky": 3}
    assert elapsed >= 0.3 - 0.01  # 0.1 s, then 0.2 s
    assert gap < 0.1, f"the loop stalled {gap:.3f} s during backoff"


# -- retries and terminal failures ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["coroutine", "plain"])
def test_retryable_errors_back_off_exponentially(rt: Runtime, clock: FakeClock, kind: str) -> None:
    def flaky_plain() -> str:
        calls["flaky"] += 1
        if calls["flaky"] <= 8:
            raise ConnectionError("try later")
        return "ok"

    async def flaky_coroutine() -> str:
        return flaky_plain()

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        fn = flaky_coroutine if kind == "coroutine" else flaky_plain
        return await ctx.run(fn, name="flaky")

    assert drive(rt.ainvoke("h", invocation_id="x")) == "ok"
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    [entry] = rt.backend.read_entries("x")
    assert entry.attempts == 9
    assert drive(rt.ainvoke("h", invocation_id="x")) == "ok"
    assert calls == {"flaky": 9}


def test_futures_retry_with_their_own_budgets(rt: Runtime, clock: FakeClock) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> list[str]:
        def flaky(name: str) -> Callable[[], Awaitable[str]]:
            async def fn() -> str:
                calls[name] += 1
                if calls[name] <= 2:
                    raise ConnectionError("try later")
                return name

            return fn

        futs = [ctx.run_async(flaky(n), name=n, max_retry_attempts=2) for n in "ab"]
        return [await f for f in futs]

    assert drive(rt.ainvoke("h", invocation_id="x")) == ["a", "b"]
    assert calls == {"a": 3, "b": 3}
    assert [e.attempts for e in rt.backend.read_entries("x")] == [3, 3]
    assert sorted(clock.sleeps) == pytest.approx([0.05, 0.05, 0.1, 0.1])


def test_the_testing_switch_removes_waits(rt: Runtime, clock: FakeClock) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> None:
        async def flaky() -> None:
            calls["f"] += 1
            if calls["f"] < 5:
                raise ConnectionError("reset")

        await ctx.run(flaky, name="ship")

    set_testing(True)
    try:
        drive(rt.ainvoke("h"))
    finally:
        set_testing(False)
    assert calls["f"] == 5 and clock.sleeps == []


def test_exhausted_retries_become_a_journaled_terminal_error(rt: Runtime) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> None:
        async def boom() -> None:
            calls["boom"] += 1
            raise ValueError("bad gateway")

        await ctx.run(boom, name="ship", max_retry_attempts=2)

    with pytest.raises(TerminalError) as info:
        drive(rt.ainvoke("h", invocation_id="x"))
    message = str(info.value)
    assert "ValueError" in message and "bad gateway" in message and "3 attempts" in message
    assert calls == {"boom": 3}
    assert rt.status("x") is InvocationStatus.FAILED
    with pytest.raises(TerminalError, match="bad gateway"):
        drive(rt.ainvoke("h", invocation_id="x"))
    assert calls == {"boom": 3}


def test_the_retry_budget_survives_a_crash_in_a_retry(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    """Two failed attempts, then the process dies inside the third: with
    max_retry_attempts=2 the budget is spent, so the replay calls nothing."""

    async def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] <= 2:
            raise ConnectionError("try later")
        raise Crash

    async def handler(ctx: AsyncContext, _: Any) -> str:
        return await ctx.run(flaky, name="flaky", max_retry_attempts=2)

    set_testing(True)
    try:
        a = runtimes(one_journal(), worker_id="a")
        a.handler("h")(handler)
        with pytest.raises(Crash):
            drive(a.ainvoke("h", invocation_id="x"))
        assert calls == {"flaky": 3}
        b = runtimes(one_journal(), worker_id="b")
        b.handler("h")(handler)
        with pytest.raises(TerminalError, match="attempt 3 started and never finished"):
            drive(b.ainvoke("h", invocation_id="x"))
    finally:
        set_testing(False)
    assert calls == {"flaky": 3}
    [entry] = b.backend.read_entries("x")
    assert entry.attempts == 3 and entry.failure is not None


@pytest.mark.parametrize("kind", ["coroutine", "plain", "future"])
def test_terminal_errors_are_journaled_and_replayed(
    one_journal: Opener, runtimes: Callable[..., Runtime], kind: str
) -> None:
    caught: list[BaseException] = []
    plan = {"crash": True}

    def decline_plain() -> None:
        calls["pay"] += 1
        raise Declined("card declined")

    async def decline_coroutine() -> None:
        decline_plain()

    async def handler(ctx: AsyncContext, _: Any) -> str:
        try:
            if kind == "future":
                await ctx.run_async(decline_coroutine, name="pay")
            else:
                fn = decline_coroutine if kind == "coroutine" else decline_plain
                await ctx.run(fn, name="pay", max_retry_attempts=5)
        except Declined as exc:
            caught.append(exc)
        if plan["crash"]:
            raise Crash
        await ctx.run(_decline_again, name="refund")
        return "unreachable"

    a = runtimes(one_journal(), worker_id="a")
    a.handler("h")(handler)
    with pytest.raises(Crash):
        drive(a.ainvoke("h", invocation_id="x"))
    plan["crash"] = False
    b = runtimes(one_journal(), worker_id="b")
    b.handler("h")(handler)
    with pytest.raises(Declined, match="refund declined"):
        drive(b.ainvoke("h", invocation_id="x"))
    assert calls == {"pay": 1, "refund": 1}  # never retried, never called again
    assert [str(e) for e in caught] == ["card declined"] * 2
    assert all(type(e) is Declined for e in caught)
    assert isinstance(caught[0].__cause__, Declined) and caught[1].__cause__ is None
    assert b.status("x") is InvocationStatus.FAILED
    with pytest.raises(Declined, match="refund declined"):  # the stored failure
        drive(b.ainvoke("h", invocation_id="x"))
    assert len(caught) == 2


def _decline_again() -> None:
    calls["refund"] += 1
    raise Declined("refund declined")


def test_a_codec_failure_is_not_retried_and_leaves_the_invocation_pending(rt: Runtime) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> None:
        async def make() -> object:
            calls["obj"] += 1
            return object()

        await ctx.run(make, name="obj")

    with pytest.raises(CodecError, match=r"'obj'.*json.*object"):
        drive(rt.ainvoke("h", invocation_id="x"))
    assert calls == {"obj": 1}
    assert rt.backend.read_entries("x") == []
    assert rt.status("x") is InvocationStatus.PENDING


# -- misuse ----------------------------------------------------------------------------------


def _ops(ctx: AsyncContext, other: AsyncRunFuture[Any]) -> dict[str, Callable[[], Any]]:
    """Each ctx operation, called (what is refused is the call, before any await)."""
    return {
        "run": lambda: ctx.run(lambda: calls.update(["inner"]), name="inner"),
        "run_void": lambda: ctx.run_void(lambda: calls.update(["inner"]), name="inner"),
        "run_async": lambda: ctx.run_async(lambda: calls.update(["inner"]), name="inner"),
        "wait_first": lambda: ctx.wait_first(other),
        "wait": lambda: ctx.wait(other),
    }


def _call_in_thread(fn: Callable[[], Any]) -> BaseException | None:
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(WAIT)
    return raised[0] if raised else None


def _refused(fn: Callable[[], Any]) -> BaseException | None:
    """Call ``fn``; return what it raised (closing a coroutine it returned)."""
    try:
        made = fn()
    except BaseException as exc:
        return exc
    if asyncio.iscoroutine(made):
        made.close()
    return None


WHERE = ["coroutine closure", "plain closure", "task of a closure", "thread of a closure"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("op", ["run", "run_void", "run_async", "wait_first", "wait"])
def test_ctx_inside_a_closure_is_refused_and_not_retried(rt: Runtime, op: str, where: str) -> None:
    seen: list[BaseException | None] = []

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        other = ctx.run_async(lambda: "other", name="other")
        await other
        call = _ops(ctx, other)[op]

        async def in_coroutine() -> str:
            calls["outer"] += 1
            if where == "task of a closure":

                async def task() -> BaseException | None:
                    return _refused(call)

                seen.append(await asyncio.get_running_loop().create_task(task()))
            elif where == "thread of a closure":
                seen.append(await asyncio.to_thread(_call_in_thread, call))
            else:
                seen.append(_refused(call))
            return "outer"

        def in_thread() -> str:
            calls["outer"] += 1
            seen.append(_refused(call))
            return "outer"

        fn = in_thread if where == "plain closure" else in_coroutine
        return await ctx.run(fn, name="outer", max_retry_attempts=3)

    assert drive(rt.ainvoke("h", invocation_id="x")) == "outer"
    [error] = seen
    assert isinstance(error, ContextMisuseError), error
    assert f"ctx.{op}()" in str(error)
    assert calls == {"outer": 1}
    assert names(rt.backend, "x") == [(0, "other"), (1, "outer")]


def test_a_closure_raising_misuse_is_not_retried(rt: Runtime) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> None:
        async def outer() -> None:
            calls["outer"] += 1
            await ctx.run(lambda: calls.update(["inner"]), name="inner")

        await ctx.run(outer, name="outer", max_retry_attempts=5)

    with pytest.raises(ContextMisuseError, match=r"ctx\.run\(\) was called inside a run closure"):
        drive(rt.ainvoke("h", invocation_id="x"))
    assert calls == {"outer": 1}
    assert rt.backend.read_entries("x") == []


def test_ctx_from_another_task_than_the_handlers_is_refused(rt: Runtime) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        async def helper() -> str:
            return await ctx.run(lambda: "from-helper", name="helper")

        with pytest.raises(ContextMisuseError, match="from another task than the handler's"):
            await asyncio.get_running_loop().create_task(helper())
        return await ctx.run(lambda: "mine", name="mine")

    assert drive(rt.ainvoke("h", invocation_id="x")) == "mine"
    assert names(rt.backend, "x") == [(0, "mine")]


@pytest.mark.parametrize("op", ["run", "run_void", "run_async", "wait_first", "wait"])
def test_a_kept_context_is_refused_after_its_attempt_ended(rt: Runtime, op: str) -> None:
    kept: list[tuple[AsyncContext, AsyncRunFuture[Any]]] = []

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        fut = ctx.run_async(lambda: "a", name="a")
        kept.append((ctx, fut))
        return await fut

    assert drive(rt.ainvoke("h", invocation_id="x")) == "a"
    ctx, fut = kept[0]

    async def later() -> BaseException | None:  # on another loop, as a later request would
        return _refused(_ops(ctx, fut)[op])

    error = drive(later())
    assert isinstance(error, ContextMisuseError)
    assert "after its attempt ended" in str(error)
    assert isinstance(_refused(_ops(ctx, fut)[op]), ContextMisuseError)  # and from no loop
    assert "inner" not in calls
    assert names(rt.backend, "x") == [(0, "a")]


def test_result_on_an_async_future_is_refused_await_it_instead(rt: Runtime) -> None:
    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        fut = ctx.run_async(lambda: "a", name="a")
        with pytest.raises(ContextMisuseError, match=r"\.result\(\) would block the event loop"):
            fut.result()
        value: str = await fut
        assert fut.done()
        with pytest.raises(ContextMisuseError, match="`await` the future instead"):
            fut.result()  # refused even when it would not block
        return value

    assert drive(rt.ainvoke("h", invocation_id="x")) == "a"


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("op", ["run", "run_void", "wait_first", "wait"])
def test_a_ctx_operation_never_awaited_is_a_clear_error(rt: Runtime, op: str) -> None:
    """Called like a sync ctx operation (no await), a step would silently never run:
    the invocation must not complete over the hole it leaves."""
    kept: list[Any] = []

    @rt.handler("h")
    async def h(ctx: AsyncContext, _: Any) -> str:
        fut = ctx.run_async(lambda: "a", name="a")
        await fut
        forgotten = _ops(ctx, fut)[op]()  # no await
        kept.append(forgotten)
        return await ctx.run(lambda: "after", name="after")

    with pytest.raises(ContextMisuseError, match=r"never awaited: index 1 \("):
        drive(rt.ainvoke("h", invocation_id="x"))
    for forgotten in kept:
        if asyncio.iscoroutine(forgotten):
            forgotten.close()
    assert "inner" not in calls
    assert names(rt.backend, "x") == [(0, "a"), (2, "after")]
    assert rt.status("x") is InvocationStatus.PENDING


# -- leases ------------------------------------------------------------------------------------


def _attached_pair(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> tuple[Runtime, Runtime, dict[str, Any]]:
    """Two workers with the same handler; its slow step waits for ``state["gate"]``."""
    state: dict[str, Any] = {"entered": threading.Event()}

    async def handler(ctx: AsyncContext, _: Any) -> str:
        async def slow() -> str:
            calls["slow"] += 1
            state["entered"].set()
            await asyncio.wait_for(state["gate"].wait(), WAIT)
            return "done"

        value: str = await ctx.run(slow, name="slow")
        return value + await ctx.run(lambda: calls.update(["after"]) or "|after", name="after")

    first = runtimes(one_journal(), worker_id="a")
    second = runtimes(one_journal(), worker_id="b")
    first.handler("h")(handler)
    second.handler("h")(handler)
    return first, second, state


def test_ainvoke_of_an_id_another_worker_runs_waits_for_its_outcome(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    first, second, state = _attached_pair(one_journal, runtimes)

    async def main() -> list[str]:
        state["gate"] = asyncio.Event()
        loop = asyncio.get_running_loop()
        t1 = loop.create_task(first.ainvoke("h", invocation_id="inv"))
        assert await asyncio.to_thread(state["entered"].wait, WAIT)
        t2 = loop.create_task(second.ainvoke("h", invocation_id="inv", timeout=WAIT))
        t3 = loop.create_task(first.ainvoke("h", invocation_id="inv"))  # same worker, again
        await asyncio.sleep(0.2)
        assert not t2.done() and not t3.done()  # waiting, not running
        assert calls == {"slow": 1}
        state["gate"].set()
        return list(await asyncio.gather(t1, t2, t3))

    assert drive(main()) == ["done|after"] * 3
    assert calls == {"slow": 1, "after": 1}


def test_the_wait_for_another_worker_is_bounded_by_timeout(
    one_journal: Opener, runtimes: Callable[..., Runtime]
) -> None:
    first, second, state = _attached_pair(one_journal, runtimes)

    async def main() -> str:
        state["gate"] = asyncio.Event()
        t1 = asyncio.get_running_loop().create_task(first.ainvoke("h", invocation_id="inv"))
        assert await asyncio.to_thread(state["entered"].wait, WAIT)
        started = time.monotonic()
        with pytest.raises(InvocationTimeout, match="still running on worker 'a'"):
            await second.ainvoke("h", invocation_id="inv", timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 5
        state["gate"].set()
        out: str = await t1
        assert await second.ainvoke("h", invocation_id="inv") == out
        return out

    assert drive(main()) == "done|after"
    assert calls == {"slow": 1, "after": 1}


def test_aclose_cancels_the_recoveries_it_runs_in_the_background() -> None:
    backend = MemoryBackend()
    seed = Runtime(backend, worker_id="seed")

    @seed.handler("h")
    async def fail(ctx: AsyncContext, _: Any) -> None:
        raise RuntimeError("left pending")

    with pytest.raises(RuntimeError):
        asyncio.run(seed.ainvoke("h", invocation_id="slow"))
    seed.close()
    started = threading.Event()

    async def main() -> None:
        rt = Runtime(backend)

        @rt.handler("h")
        async def slow(ctx: AsyncContext, _: Any) -> str:
            async def forever() -> str:
                started.set()
                await asyncio.sleep(60)
                return "never"

            return await ctx.run(forever, name="forever")

        rt.start_recovery(interval=0.05)
        for _ in range(200):
            if started.is_set():
                break
            await asyncio.sleep(0.01)
        assert started.is_set()
        await asyncio.wait_for(rt.aclose(), 10)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []  # nothing of the Runtime's goes on after aclose()

    asyncio.run(main())
    stored = backend.get_invocation("slow")
    assert stored is not None and stored.status is InvocationStatus.PENDING
    assert backend.read_entries("slow") == []
