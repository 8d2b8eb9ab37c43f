"""DESIGN's semantics rules 7 (invocations) and 8 (conflicts), on the memory engine."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from runjournal.backends import MemoryBackend, MemoryStore
from runjournal.context import (
    Context,
    HandlerNotFound,
    InvocationMismatch,
    Runtime,
    TerminalError,
)
from runjournal.journal import InvocationStatus, JSONCodec, MsgpackCodec
from tests.conftest import FakeClock

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


class Crash(Exception):
    pass


def test_completed_invocation_returns_stored_output_without_running(rt: Runtime) -> None:
    @rt.handler("greet")
    def greet(ctx: Context, who: str) -> str:
        calls["handler"] += 1
        return ctx.run(lambda: f"hello {who}", name="greet")  # type: ignore[no-any-return]

    assert rt.invoke("greet", "ada", invocation_id="g1") == "hello ada"
    assert rt.invoke(greet, "ada", invocation_id="g1") == "hello ada"
    assert calls == {"handler": 1}
    stored = rt.backend.get_invocation("g1")
    assert stored is not None
    assert stored.status is InvocationStatus.COMPLETED
    assert (stored.input, stored.output, stored.codec) == (b'"ada"', b'"hello ada"', "json")


def test_terminal_handler_failure_completes_as_failed(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        calls["handler"] += 1
        raise TerminalError("order invalid")

    for _ in range(2):
        with pytest.raises(TerminalError, match="order invalid"):
            rt.invoke("h", invocation_id="x")
    assert calls == {"handler": 1}
    assert rt.status("x") is InvocationStatus.FAILED


def test_other_exceptions_leave_it_pending_and_invoke_resumes(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, n: int) -> int:
        a = ctx.run(lambda: calls.update(["a"]) or n + 1, name="a")
        if calls["handler"] == 0:
            calls["handler"] += 1
            raise Crash("deploy")
        return ctx.run(lambda: a * 10, name="b")  # type: ignore[no-any-return]

    with pytest.raises(Crash):
        rt.invoke("h", 1, invocation_id="x")
    assert rt.status("x") is InvocationStatus.PENDING
    assert rt.invoke("h", 1, invocation_id="x") == 20
    assert calls["a"] == 1


def test_recover_resumes_pending_invocations(backend: MemoryBackend, clock: FakeClock) -> None:
    crashing = Runtime(backend, clock=clock)
    fail_once = [True]

    def process(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        ctx.run_void(lambda: calls.update(["log"]), name="log")
        if fail_once[0]:
            raise Crash
        return {"id": order["id"], "done": True}

    crashing.handler("orders")(process)
    for i in range(3):
        with pytest.raises(Crash):
            crashing.invoke("orders", {"id": i}, invocation_id=f"o{i}")

    @crashing.handler("other-service")
    def other(ctx: Context, _: Any) -> None:
        raise Crash

    with pytest.raises(Crash):
        crashing.invoke("other-service", None, invocation_id="foreign")

    fail_once[0] = False
    fresh = Runtime(MemoryBackend(backend.store), clock=clock)
    fresh.handler("orders")(process)
    results = fresh.recover()
    assert [(r.invocation_id, r.status, r.output) for r in results] == [
        (f"o{i}", InvocationStatus.COMPLETED, {"id": i, "done": True}) for i in range(3)
    ]
    assert calls["log"] == 3
    assert fresh.status("foreign") is InvocationStatus.PENDING
    assert fresh.recover() == []


def test_recover_reports_failures_and_still_pending(rt: Runtime) -> None:
    mode = ["crash"]

    @rt.handler("h")
    def h(ctx: Context, n: int) -> None:
        if mode[0] == "crash" or n == 1:
            raise Crash("still broken")
        raise TerminalError("gave up")

    for n in range(2):
        with pytest.raises(Crash):
            rt.invoke("h", n, invocation_id=f"x{n}")
    mode[0] = "recover"
    results = {r.invocation_id: r for r in rt.recover()}
    assert results["x0"].status is InvocationStatus.FAILED
    assert isinstance(results["x0"].error, TerminalError)
    assert results["x1"].status is InvocationStatus.PENDING
    assert isinstance(results["x1"].error, Crash)


def test_reusing_an_id_with_another_handler_is_refused(rt: Runtime) -> None:
    rt.handler("a")(lambda ctx, _: 1)
    rt.handler("b")(lambda ctx, _: 2)
    rt.invoke("a", None, invocation_id="x")
    with pytest.raises(InvocationMismatch, match="belongs to handler 'a', not 'b'"):
        rt.invoke("b", None, invocation_id="x")


def test_reusing_an_id_with_another_input_is_refused(rt: Runtime) -> None:
    rt.handler("a")(lambda ctx, n: n)
    rt.invoke("a", {"n": 1, "m": 2}, invocation_id="x")
    assert rt.invoke("a", {"m": 2, "n": 1}, invocation_id="x") == {"n": 1, "m": 2}
    with pytest.raises(InvocationMismatch, match="another input"):
        rt.invoke("a", {"n": 2}, invocation_id="x")


def test_handler_codec_is_used_for_input_and_output(rt: Runtime) -> None:
    @rt.handler("bin", codec=MsgpackCodec())
    def h(ctx: Context, data: bytes) -> bytes:
        return data[::-1]

    assert rt.invoke("bin", b"\x01\x02", invocation_id="x") == b"\x02\x01"
    stored = rt.backend.get_invocation("x")
    assert stored is not None and stored.codec == "msgpack"
    assert MsgpackCodec().decode(stored.output or b"") == b"\x02\x01"


def test_unknown_handler_and_bad_input_are_clear(rt: Runtime) -> None:
    with pytest.raises(HandlerNotFound, match="no handler 'nope'"):
        rt.invoke("nope")
    rt.handler("h")(lambda ctx, x: x)
    from runjournal.journal import CodecError

    with pytest.raises(CodecError, match="the input cannot be journaled: the json codec cannot"):
        rt.invoke("h", object())


def test_generated_invocation_ids_are_distinct(rt: Runtime) -> None:
    rt.handler("h")(lambda ctx, x: ctx.invocation_id)
    ids = {rt.invoke("h") for _ in range(5)}
    assert len(ids) == 5


def test_runtime_from_url_and_default_codec() -> None:
    with Runtime("memory://") as rt:
        assert isinstance(rt.backend, MemoryBackend)
        assert isinstance(rt.codec, JSONCodec)


# -- 8. conflicts ----------------------------------------------------------------


def test_workers_racing_on_one_id_run_it_once_and_agree() -> None:
    """Six workers invoke one id at once: one takes the lease and runs each closure,
    the others wait for its outcome; all return the same value."""
    store = MemoryStore()
    n = 6
    barrier = threading.Barrier(n)
    outcomes: list[Any] = [None] * n
    calls: list[int] = []

    def worker(i: int) -> None:
        rt = Runtime(MemoryBackend(store))

        @rt.handler("race")
        def race(ctx: Context, _: Any) -> int:
            def step() -> int:
                calls.append(i)
                time.sleep(0.05)  # long enough for every other worker to arrive
                return i

            return ctx.run(step, name="pick") * 100  # type: ignore[no-any-return]

        barrier.wait(timeout=10)
        try:
            outcomes[i] = rt.invoke("race", None, invocation_id="shared", timeout=30)
        finally:
            rt.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, calls
    assert outcomes == [calls[0] * 100] * n
    entries = MemoryBackend(store).read_entries("shared")
    assert [e.payload for e in entries] == [str(calls[0]).encode()]


def _child_id(queue: Any) -> None:
    from runjournal.context._ids import new_invocation_id

    queue.put(new_invocation_id())


def test_generated_ids_differ_between_a_process_and_its_forked_child() -> None:
    import multiprocessing

    from runjournal.context._ids import new_invocation_id

    new_invocation_id()  # the parent now holds unread random bytes
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_id, args=(queue,))
    child.start()
    child.join(30)
    # A child reading the parent's unread bytes would hand out the parent's next id.
    assert queue.get(timeout=5) != new_invocation_id()


def test_generated_ids_are_random_uuid4s_from_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import uuid

    from runjournal.context._ids import new_invocation_id

    reads: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    ids = [new_invocation_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(uuid.UUID(hex=i).version == 4 for i in ids)
    # Batched: a few reads of the OS's randomness for a thousand ids, not one each.
    assert 1 <= len(reads) <= 5 and sum(reads) >= 16 * (1000 - 256)
