"""Futures (issue 5): ctx.run_async, ctx.wait_first and ctx.wait, on every engine available.

Orders are forced with threading.Event and ``fut.result()`` in the handler
(which returns once an entry is durable), not with sleeps. A "crash" is a copy
of the journal taken at one moment into a fresh backend of the same engine:
the replay runs on that copy, as a new process would after dying there.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest

from runjournal.backends import MemoryBackend
from runjournal.context import (
    Context,
    ContextMisuseError,
    NonDeterminismError,
    RunFuture,
    Runtime,
    TerminalError,
)
from runjournal.journal import (
    CodecError,
    Entry,
    EntryKind,
    InvocationStatus,
    JournalBackend,
)
from tests.conftest import FakeClock

T = TypeVar("T")

WAIT = 10.0  # a generous bound for every Event/barrier wait: a hang fails, not blocks


@pytest.fixture
def make_runtime(
    new_backend: Callable[[], JournalBackend],
) -> Iterator[Callable[..., Runtime]]:
    """Builds Runtimes (on a fresh backend unless given one); closes them afterwards."""
    runtimes: list[Runtime] = []

    def make(backend: JournalBackend | None = None, **kwargs: Any) -> Runtime:
        rt = Runtime(backend if backend is not None else new_backend(), clock=FakeClock(), **kwargs)
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        rt.close()


@pytest.fixture
def rt(make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime()


def crash_image(source: JournalBackend, invocation_id: str, target: JournalBackend) -> None:
    """Copy what ``source`` holds of one invocation right now into ``target``."""
    stored = source.get_invocation(invocation_id)
    assert stored is not None
    target.create_invocation(attrs.evolve(stored, version=0))
    for entry in source.read_entries(invocation_id):
        target.append_entry(invocation_id, entry)


calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


class Crash(Exception):
    """Stands for the process dying between two steps."""


class Declined(TerminalError):
    pass


def gated(name: str, gates: dict[str, threading.Event], value: Any = None) -> Callable[[], Any]:
    """A closure that counts its call, waits for its gate, and returns ``value``."""

    def fn() -> Any:
        calls[name] += 1
        assert gates[name].wait(WAIT), f"gate {name!r} never opened"
        return value if value is not None else name.upper()

    return fn


def returning(value: T) -> Callable[[], T]:
    return lambda: value


def decision(backend: JournalBackend, invocation_id: str, index: int) -> tuple[EntryKind, Any]:
    [entry] = [e for e in backend.read_entries(invocation_id) if e.index == index]
    assert entry.payload is not None
    return entry.kind, json.loads(entry.payload)


# -- concurrency -----------------------------------------------------------------


def test_four_slow_closures_run_concurrently(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[int]:
        def sleeper(i: int) -> Callable[[], int]:
            def fn() -> int:
                time.sleep(0.3)
                return i

            return fn

        futs = [ctx.run_async(sleeper(i), name=f"s{i}") for i in range(4)]
        return [f.result() for f in futs]

    start = time.monotonic()
    assert rt.invoke("h", invocation_id="x") == [0, 1, 2, 3]
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"four 0.3 s closures took {elapsed:.2f} s: they did not overlap"
    entries = rt.backend.read_entries("x")
    assert [(e.index, e.kind, e.name) for e in entries] == [
        (i, EntryKind.RUN, f"s{i}") for i in range(4)
    ]


def test_the_executor_is_bounded_by_max_workers(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(max_workers=2)
    running = [0]
    peak = [0]
    lock = threading.Lock()

    def slow() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        for f in [ctx.run_async(slow, name=f"s{i}") for i in range(5)]:
            f.result()

    rt.invoke("h")
    assert peak[0] == 2


def test_run_async_takes_its_index_when_called_and_may_complete_out_of_order(
    rt: Runtime,
) -> None:
    gates = {"slow": threading.Event()}
    finished: list[str] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[Any]:
        slow = ctx.run_async(gated("slow", gates), name="slow")
        mid = ctx.run(lambda: "MID", name="mid")
        fast = ctx.run_async(lambda: "FAST", name="fast")
        fast.result()
        finished.append(f"fast durable, {len(ctx_entries(ctx))} entries")
        gates["slow"].set()
        return [slow.result(), mid, fast.result()]

    def ctx_entries(ctx: Context) -> list[Entry]:
        return rt.backend.read_entries(ctx.invocation_id)

    assert rt.invoke("h", invocation_id="x") == ["SLOW", "MID", "FAST"]
    # "fast" (index 2) was durable while "slow" (index 0) was still running.
    assert finished == ["fast durable, 2 entries"]
    assert [(e.index, e.name) for e in rt.backend.read_entries("x")] == [
        (0, "slow"),
        (1, "mid"),
        (2, "fast"),
    ]


# -- wait_first and wait replay their journaled decisions ------------------------


def test_wait_first_winner_replays_though_timings_reverse_and_others_are_journaled(
    make_runtime: Callable[..., Runtime], new_backend: Callable[[], JournalBackend]
) -> None:
    """Attempt 1: c, then a, are durable; b hangs. wait_first picks c. The process
    dies there. The replay: a and c are journaled, b now finishes at once and is
    done before wait_first is called; c must still win."""
    image = new_backend()
    plan: dict[str, Any] = {"release": ["c", "a"], "crash_image": True}
    gates = {n: threading.Event() for n in "abc"}

    def handler(ctx: Context, _: Any) -> str:
        futs = {n: ctx.run_async(gated(n, gates), name=n) for n in "abc"}
        for n in plan["release"]:  # force the completion order
            gates[n].set()
            futs[n].result()
        first = ctx.wait_first(futs["a"], futs["b"], futs["c"])
        if plan["crash_image"]:
            crash_image(ctx_backend[0], ctx.invocation_id, image)
        for gate in gates.values():
            gate.set()
        return first.name or ""

    ctx_backend: list[JournalBackend] = []
    first_rt = make_runtime()
    ctx_backend.append(first_rt.backend)
    first_rt.handler("h")(handler)
    assert first_rt.invoke("h", invocation_id="x") == "c"
    assert decision(first_rt.backend, "x", 3) == (
        EntryKind.WAIT_FIRST,
        {"of": [0, 1, 2], "winner": 2},
    )
    assert [e.name for e in image.read_entries("x")] == ["a", "c", None]

    calls.clear()
    plan.update(release=["b", "a", "c"], crash_image=False)
    for gate in gates.values():
        gate.clear()
    # The worker restarts under its own id, so it takes its invocation back at once.
    replay_rt = make_runtime(image, worker_id=first_rt.worker_id)
    replay_rt.handler("h")(handler)
    assert replay_rt.invoke("h", invocation_id="x") == "c"
    assert calls == {"b": 1}  # only the unfinished future ran again
    assert replay_rt.status("x") is InvocationStatus.COMPLETED


def test_wait_order_replays_unchanged(rt: Runtime) -> None:
    gates = {n: threading.Event() for n in "abc"}
    plan = {"release": "cab"}
    seen: list[list[str]] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        futs = {n: ctx.run_async(gated(n, gates), name=n) for n in "abc"}
        for n in plan["release"]:
            gates[n].set()
            futs[n].result()
        order = [f.name or "" for f in ctx.wait(futs["a"], futs["b"], futs["c"])]
        seen.append(order)
        if len(seen) == 1:
            raise Crash
        return order

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    assert decision(rt.backend, "x", 3) == (EntryKind.WAIT, {"of": [0, 1, 2], "order": [2, 0, 1]})
    plan["release"] = "bac"  # reversed timings; every outcome is journaled now
    for gate in gates.values():
        gate.clear()
    assert rt.invoke("h", invocation_id="x") == ["c", "a", "b"]
    assert seen == [["c", "a", "b"], ["c", "a", "b"]]
    assert calls == {"a": 1, "b": 1, "c": 1}


def test_wait_first_then_wait_on_the_same_futures(rt: Runtime) -> None:
    """DESIGN's example: a future may take part in several wait calls."""
    gates = {n: threading.Event() for n in "ab"}
    runs = [0]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> dict[str, Any]:
        a = ctx.run_async(gated("a", gates), name="a")
        b = ctx.run_async(gated("b", gates), name="b")
        gates["b"].set()
        first = ctx.wait_first(a, b)
        gates["a"].set()
        order = [f.result() for f in ctx.wait(a, b)]
        runs[0] += 1
        if runs[0] == 1:
            raise Crash
        return {"first": first.result(), "order": order, "done": first.done()}

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    expected = {"first": "B", "order": ["B", "A"], "done": True}
    assert rt.invoke("h", invocation_id="x") == expected
    kinds = [(e.index, e.kind) for e in rt.backend.read_entries("x")]
    assert kinds == [
        (0, EntryKind.RUN),
        (1, EntryKind.RUN),
        (2, EntryKind.WAIT_FIRST),
        (3, EntryKind.WAIT),
    ]


def test_wait_first_in_a_loop_journals_each_choice(rt: Runtime) -> None:
    """Handling futures one by one as they complete: each choice is journaled."""
    gates = {n: threading.Event() for n in "abc"}
    runs = [0]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        futs = {n: ctx.run_async(gated(n, gates), name=n) for n in "abc"}
        for n in "bca" if runs[0] == 0 else "abc":
            gates[n].set()
            futs[n].result()
        pending = list(futs.values())
        handled = []
        while pending:
            fut = ctx.wait_first(*pending)
            pending.remove(fut)
            handled.append(ctx.run(returning(f"handled {fut.name}"), name="handle"))
        runs[0] += 1
        if runs[0] == 1:
            raise Crash
        return handled

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    assert rt.invoke("h", invocation_id="x") == ["handled b", "handled c", "handled a"]
    kinds = [e.kind for e in rt.backend.read_entries("x")][3:]
    assert kinds == [EntryKind.WAIT_FIRST, EntryKind.RUN] * 3
    assert calls == {"a": 1, "b": 1, "c": 1}


def test_decisions_mismatching_the_journal_raise_non_determinism(rt: Runtime) -> None:
    plan = {"members": "ab"}

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        futs = {n: ctx.run_async(returning(n), name=n) for n in "ab"}
        ctx.wait_first(*(futs[n] for n in plan["members"]))
        raise Crash

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    plan["members"] = "a"
    with pytest.raises(NonDeterminismError) as info:
        rt.invoke("h", invocation_id="x")
    assert info.value.index == 2
    assert "[0, 1]" in str(info.value) and "[0]" in str(info.value)


def test_wait_where_a_run_was_journaled_raises_non_determinism(rt: Runtime) -> None:
    plan = {"wait": False}

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        a = ctx.run_async(lambda: 1, name="a")
        if plan["wait"]:
            list(ctx.wait(a))
        else:
            ctx.run(lambda: 2, name="b")
        raise Crash

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    plan["wait"] = True
    with pytest.raises(NonDeterminismError, match=r"index 1.*run 'b'.*unnamed wait"):
        rt.invoke("h", invocation_id="x")


# -- crash and replay --------------------------------------------------------------


def test_a_crash_after_some_futures_finished_reruns_only_the_unfinished(
    make_runtime: Callable[..., Runtime], new_backend: Callable[[], JournalBackend]
) -> None:
    image = new_backend()
    gates = {n: threading.Event() for n in ["q1", "q2", "s1", "s2"]}
    first_attempt = [True]

    def handler(ctx: Context, _: Any) -> list[Any]:
        futs = [ctx.run_async(gated(n, gates), name=n) for n in ["q1", "s1", "q2", "s2"]]
        if first_attempt[0]:
            gates["q1"].set()
            gates["q2"].set()
            futs[0].result()
            futs[2].result()
            crash_image(origin.backend, ctx.invocation_id, image)
        for gate in gates.values():
            gate.set()
        return [f.result() for f in futs]

    origin = make_runtime()
    origin.handler("h")(handler)
    origin.invoke("h", invocation_id="x")
    assert sorted(e.name or "" for e in image.read_entries("x")) == ["q1", "q2"]

    first_attempt[0] = False
    calls.clear()
    replay = make_runtime(image, worker_id=origin.worker_id)
    replay.handler("h")(handler)
    assert replay.invoke("h", invocation_id="x") == ["Q1", "S1", "Q2", "S2"]
    assert calls == {"s1": 1, "s2": 1}
    assert [(e.index, e.name) for e in image.read_entries("x")] == [
        (0, "q1"),
        (1, "s1"),
        (2, "q2"),
        (3, "s2"),
    ]


def test_journaled_futures_resolve_at_once_on_replay(rt: Runtime) -> None:
    states: list[bool] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> Any:
        fut = ctx.run_async(lambda: calls.update(["f"]) or {"n": (1, 2)}, name="f")
        states.append(fut.done())
        value = fut.result()
        if len(states) == 1:
            raise Crash
        return value

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    assert rt.invoke("h", invocation_id="x") == {"n": [1, 2]}
    assert states[1] is True
    assert calls == {"f": 1}


# -- retries, terminal failures, codec errors ---------------------------------------


def test_retries_inside_futures_each_have_their_own_budget(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        def flaky(name: str) -> Callable[[], str]:
            def fn() -> str:
                calls[name] += 1
                if calls[name] <= 2:
                    raise ConnectionError("try later")
                return name

            return fn

        futs = [ctx.run_async(flaky(n), name=n, max_retry_attempts=2) for n in "ab"]
        return [f.result() for f in futs]

    assert rt.invoke("h", invocation_id="x") == ["a", "b"]
    assert calls == {"a": 3, "b": 3}
    assert [e.attempts for e in rt.backend.read_entries("x")] == [3, 3]


def test_terminal_failures_in_futures_are_journaled_and_replayed(rt: Runtime) -> None:
    caught: list[BaseException] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def declined() -> None:
            calls["pay"] += 1
            raise Declined("card declined")

        def broken() -> None:
            calls["ship"] += 1
            raise ValueError("bad gateway")

        pay = ctx.run_async(declined, name="pay")
        ship = ctx.run_async(broken, name="ship", max_retry_attempts=1)
        for fut in ctx.wait(pay, ship):
            try:
                fut.result()
            except TerminalError as exc:
                caught.append(exc)
        raise Crash

    for _ in range(2):
        with pytest.raises(Crash):
            rt.invoke("h", invocation_id="x")
    assert calls == {"pay": 1, "ship": 2}
    by_text = sorted((type(e).__name__, str(e)) for e in caught)
    assert by_text[:2] == [("Declined", "card declined")] * 2
    gave_up = [t for n, t in by_text if n == "TerminalError"]
    assert len(gave_up) == 2
    assert all("gave up after 2 attempts" in t and "bad gateway" in t for t in gave_up)


def test_a_codec_failure_is_not_retried_and_surfaces_from_result(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        fut = ctx.run_async(lambda: calls.update(["obj"]) or object(), name="obj")
        fut.result()

    with pytest.raises(CodecError, match=r"'obj'.*json.*object"):
        rt.invoke("h", invocation_id="x")
    assert calls == {"obj": 1}
    assert rt.backend.read_entries("x") == []
    assert rt.status("x") is InvocationStatus.PENDING


def test_a_codec_failure_surfaces_from_wait_first(rt: Runtime) -> None:
    gate = threading.Event()

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        bad = ctx.run_async(object, name="bad")
        good = ctx.run_async(lambda: gate.wait(WAIT), name="good")
        try:
            ctx.wait_first(bad, good)
        finally:
            gate.set()

    with pytest.raises(CodecError, match="'bad'"):
        rt.invoke("h", invocation_id="x")
    # Nothing was decided: only "good" is journaled, at its own index.
    assert [(e.index, e.kind) for e in rt.backend.read_entries("x")] == [(1, EntryKind.RUN)]


# -- a handler that returns while futures run -------------------------------------


def test_the_invocation_completes_only_once_every_future_is_journaled(rt: Runtime) -> None:
    gate = threading.Event()

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        ctx.run_async(lambda: gate.wait(WAIT) and calls.update(["log"]), name="log")
        threading.Timer(0.2, gate.set).start()
        return "ok"

    start = time.monotonic()
    assert rt.invoke("h", invocation_id="x") == "ok"
    assert time.monotonic() - start >= 0.2
    assert calls == {"log": 1}
    assert [e.name for e in rt.backend.read_entries("x")] == ["log"]
    assert rt.status("x") is InvocationStatus.COMPLETED


def test_an_unretrieved_unjournaled_failure_keeps_the_invocation_pending(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        ctx.run_async(object, name="unencodable")
        return "ok"

    with pytest.raises(CodecError, match="'unencodable'"):
        rt.invoke("h", invocation_id="x")
    assert rt.status("x") is InvocationStatus.PENDING


def test_an_unretrieved_terminal_failure_is_logged_and_the_invocation_completes(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        def fail() -> None:
            raise Declined("no")

        ctx.run_async(fail, name="notify")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="runjournal"):
        assert rt.invoke("h", invocation_id="x") == "ok"
    assert rt.status("x") is InvocationStatus.COMPLETED
    [record] = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert "'notify'" in record.getMessage() and "Declined: no" in record.getMessage()


def test_a_failing_handler_waits_for_its_futures_before_invoke_returns(rt: Runtime) -> None:
    gate = threading.Event()
    attempts = [0]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> Any:
        fut = ctx.run_async(lambda: (gate.wait(WAIT) and calls.update(["side"])) or 7, name="side")
        attempts[0] += 1
        if attempts[0] == 1:
            threading.Timer(0.1, gate.set).start()
            raise Crash
        return fut.result()

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    # The future was journaled before invoke returned, so the retry replays it.
    assert [e.name for e in rt.backend.read_entries("x")] == ["side"]
    assert rt.invoke("h", invocation_id="x") == 7
    assert calls == {"side": 1}


def test_an_interrupted_handler_cancels_futures_not_yet_started(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime(max_workers=1)
    gates = {"a": threading.Event(), "b": threading.Event()}
    gates["b"].set()

    started = threading.Event()

    def a() -> None:
        started.set()
        gated("a", gates)()

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        ctx.run_async(a, name="a")
        assert started.wait(WAIT)  # "a" holds the only worker
        ctx.run_async(gated("b", gates), name="b")  # queued behind it
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rt.invoke("h", invocation_id="x")
    gates["a"].set()
    rt.close()  # waits for "a"
    assert calls == {"a": 1}
    assert [e.name for e in rt.backend.read_entries("x")] == ["a"]


# -- misuse --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["run", "run_async", "wait_first", "wait", "result"])
def test_ctx_inside_an_async_closure_is_refused_and_not_retried(rt: Runtime, op: str) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        other = ctx.run_async(lambda: 1, name="other")
        other.result()
        actions: dict[str, Callable[[], Any]] = {
            "run": lambda: ctx.run(lambda: 1),
            "run_async": lambda: ctx.run_async(lambda: 1),
            "wait_first": lambda: ctx.wait_first(other),
            "wait": lambda: ctx.wait(other),
            "result": other.result,
        }

        def outer() -> None:
            calls["outer"] += 1
            actions[op]()

        ctx.run_async(outer, name="outer").result()

    label = "RunFuture.result()" if op == "result" else f"ctx.{op}()"
    with pytest.raises(ContextMisuseError, match=re.escape(f"{label} was called inside")):
        rt.invoke("h", invocation_id="x")
    assert calls == {"outer": 1}
    assert [e.name for e in rt.backend.read_entries("x")] == ["other"]


@pytest.mark.parametrize("op", ["wait", "wait_first"])
def test_bad_wait_arguments_are_clear_errors(rt: Runtime, op: str) -> None:
    cases: dict[str, tuple[type[BaseException], str]] = {
        "empty": (ValueError, rf"ctx\.{op}\(\) needs at least one future"),
        "twice": (
            ValueError,
            r"was passed <RunFuture 'a' index=0 \w+> twice; pass each future once",
        ),
        "list": (TypeError, rf"got list; to pass a collection, unpack it: ctx\.{op}\(\*futures\)"),
    }
    errors: dict[str, BaseException] = {}

    @rt.handler("h")
    def h(ctx: Context, case: str) -> None:
        a = ctx.run_async(lambda: 1, name="a")
        args: dict[str, tuple[Any, ...]] = {"empty": (), "twice": (a, a), "list": ([a],)}
        getattr(ctx, op)(*args[case])

    for case, (kind, pattern) in cases.items():
        with pytest.raises(kind, match=pattern) as info:
            rt.invoke("h", case, invocation_id=case)
        errors[case] = info.value
        # Refused before taking an index: nothing but the run is journaled.
        assert [e.index for e in rt.backend.read_entries(case)] == [0]
    assert set(errors) == set(cases)


def test_futures_of_another_invocation_or_attempt_are_refused(rt: Runtime) -> None:
    kept: dict[str, RunFuture[Any]] = {}

    @rt.handler("start")
    def start(ctx: Context, _: Any) -> None:
        kept["foreign"] = ctx.run_async(lambda: 1, name="f")

    @rt.handler("use")
    def use(ctx: Context, _: Any) -> None:
        mine = ctx.run_async(lambda: 2, name="m")
        if "earlier" not in kept:
            kept["earlier"] = mine
            raise Crash
        ctx.wait_first(mine, kept[which[0]])

    which = ["foreign"]
    rt.invoke("start", invocation_id="other")
    with pytest.raises(Crash):
        rt.invoke("use", invocation_id="x")
    with pytest.raises(ContextMisuseError, match=r"belongs to invocation 'other'; a future can"):
        rt.invoke("use", invocation_id="x")
    which[0] = "earlier"
    with pytest.raises(
        ContextMisuseError, match="belongs to an earlier attempt of this invocation"
    ):
        rt.invoke("use", invocation_id="x")
    assert [e.kind for e in rt.backend.read_entries("x")] == [EntryKind.RUN]


# -- conflicts -------------------------------------------------------------------------


def test_a_future_whose_step_another_worker_recorded_first_adopts_it(rt: Runtime) -> None:
    theirs = Entry(index=0, kind=EntryKind.RUN, name="pick", payload=b'"theirs"', codec="json")

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> Any:
        def pick() -> str:
            if calls["pick"] == 0:
                # Another worker records this step while ours runs.
                rt.backend.append_entry(ctx.invocation_id, theirs)
            calls["pick"] += 1
            return "mine"

        return ctx.run_async(pick, name="pick").result()

    # The rightful owner goes on with what was recorded first, as a replay would.
    assert rt.invoke("h", invocation_id="x") == "theirs"
    assert rt.status("x") is InvocationStatus.COMPLETED
    assert rt.invoke("h", invocation_id="x") == "theirs"
    assert calls == {"pick": 1}


def test_a_decision_recorded_by_another_worker_wins(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> Any:
        a = ctx.run_async(lambda: "A", name="a")
        a.result()
        b = ctx.run_async(lambda: "B", name="b")
        b.result()
        if calls["h"] == 0:
            calls["h"] += 1
            # Another worker decides first, and its winner is b.
            payload = json.dumps({"of": [0, 1], "winner": 1}).encode()
            rt.backend.append_entry(
                ctx.invocation_id,
                Entry(index=2, kind=EntryKind.WAIT_FIRST, name=None, payload=payload, codec="json"),
            )
        return ctx.wait_first(a, b).result()

    assert rt.invoke("h", invocation_id="x") == "B"
    assert rt.invoke("h", invocation_id="x") == "B"


# -- the runtime's executor ----------------------------------------------------------


def test_max_workers_is_validated(backend: MemoryBackend) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_workers"):
            Runtime(backend, max_workers=bad)  # type: ignore[arg-type]


def test_close_waits_for_running_futures_then_refuses_new_ones(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    started = threading.Event()

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def slow() -> None:
            started.set()
            time.sleep(0.2)

        ctx.run_async(slow, name="slow")

    worker = threading.Thread(target=rt.invoke, args=("h",), kwargs={"invocation_id": "x"})
    worker.start()
    assert started.wait(WAIT)
    rt.close()
    assert [e.name for e in rt.backend.read_entries("x")] == ["slow"]
    worker.join(WAIT)
    with pytest.raises(RuntimeError, match=r"this Runtime is closed"):
        rt.invoke("h", invocation_id="y")
