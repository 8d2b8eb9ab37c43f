"""A Context is the handler's alone: not after its attempt, not from closures or their threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runjournal import Context, ContextMisuseError, Runtime
from runjournal.backends import MemoryBackend


def _ops(ctx: Context) -> dict[str, Callable[[], Any]]:
    return {
        "run": lambda: ctx.run(lambda: "late", name="late"),
        "run_void": lambda: ctx.run_void(lambda: None, name="late"),
        "run_async": lambda: ctx.run_async(lambda: "late", name="late"),
    }


@pytest.mark.parametrize("op", ["run", "run_void", "run_async"])
def test_a_kept_context_refuses_work_after_its_invocation_ended(
    rt: Runtime, backend: MemoryBackend, op: str
) -> None:
    kept: list[Context] = []
    calls: list[str] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        kept.append(ctx)
        return ctx.run(lambda: "done", name="step")

    assert rt.invoke("h", invocation_id="inv") == "done"
    ctx = kept[0]
    with pytest.raises(ContextMisuseError, match=r"after its attempt ended"):
        _ops(ctx)[op]()
    assert calls == []
    assert [e.name for e in backend.read_entries("inv")] == ["step"]


def test_a_kept_context_refuses_wait_after_a_failed_attempt(
    rt: Runtime, backend: MemoryBackend
) -> None:
    kept: list[Context] = []
    futures: list[Any] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        kept.append(ctx)
        futures.append(ctx.run_async(lambda: 1, name="a"))
        raise RuntimeError("leaves the invocation pending")

    with pytest.raises(RuntimeError):
        rt.invoke("h", invocation_id="inv")
    with pytest.raises(ContextMisuseError, match="after its attempt ended"):
        kept[0].wait_first(futures[0])
    with pytest.raises(ContextMisuseError, match="after its attempt ended"):
        kept[0].wait(futures[0])
    assert [e.index for e in backend.read_entries("inv")] == [0]


def _thread_calling(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a new thread; return what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    return raised[0] if raised else None


@pytest.mark.parametrize("op", ["run", "run_void", "run_async"])
def test_a_thread_started_inside_a_closure_cannot_use_ctx(
    rt: Runtime, backend: MemoryBackend, op: str
) -> None:
    seen: list[BaseException | None] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        def outer() -> str:
            seen.append(_thread_calling(_ops(ctx)[op]))
            return "outer"

        return ctx.run(outer, name="outer")

    assert rt.invoke("h", invocation_id="inv") == "outer"
    assert isinstance(seen[0], ContextMisuseError)
    assert "inside a run closure" in str(seen[0])
    # Nothing was journaled while outer's closure ran: outer is index 0 and alone.
    assert [(e.index, e.name) for e in backend.read_entries("inv")] == [(0, "outer")]


def test_a_thread_started_by_a_run_async_closure_cannot_use_ctx(
    rt: Runtime, backend: MemoryBackend
) -> None:
    seen: list[BaseException | None] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        def outer() -> str:
            seen.append(_thread_calling(lambda: ctx.run(lambda: "inner", name="inner")))
            return "outer"

        return ctx.run_async(outer, name="outer").result()

    assert rt.invoke("h", invocation_id="inv") == "outer"
    assert isinstance(seen[0], ContextMisuseError)
    assert [e.name for e in backend.read_entries("inv")] == ["outer"]


def test_another_thread_of_the_handler_cannot_use_ctx(rt: Runtime, backend: MemoryBackend) -> None:
    seen: list[BaseException | None] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        seen.append(_thread_calling(lambda: ctx.run(lambda: "x", name="from-thread")))
        return ctx.run(lambda: "mine", name="mine")

    assert rt.invoke("h", invocation_id="inv") == "mine"
    assert isinstance(seen[0], ContextMisuseError)
    assert "not running the handler" in str(seen[0])
    assert [e.name for e in backend.read_entries("inv")] == ["mine"]


def test_misuse_is_not_retried_and_runs_nothing(rt: Runtime) -> None:
    calls: list[str] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def outer() -> None:
            calls.append("outer")
            ctx.run(lambda: calls.append("inner"), name="inner")

        ctx.run(outer, name="outer", max_retry_attempts=5)

    with pytest.raises(ContextMisuseError):
        rt.invoke("h", invocation_id="inv")
    assert calls == ["outer"]


# -- what can be registered ------------------------------------------------------


def _generator(ctx: Context, _: Any) -> Iterator[int]:
    yield ctx.run(lambda: 1)


async def _coroutine(ctx: Context, _: Any) -> None:
    await asyncio.sleep(0)


def test_a_generator_handler_is_refused_at_registration(rt: Runtime) -> None:
    with pytest.raises(TypeError, match="'gen' is a generator function.*return a value"):
        rt.handler("gen")(_generator)
    assert rt.status("anything") is None


def test_a_non_callable_handler_is_refused_at_registration(rt: Runtime) -> None:
    with pytest.raises(TypeError, match="handler 'x' must be a function fn\\(ctx, input\\)"):
        rt.handler("x")(42)  # type: ignore[type-var]


def test_a_decorated_generator_is_still_refused(rt: Runtime) -> None:
    import functools

    @functools.wraps(_generator)
    def wrapper(ctx: Context, x: Any) -> Iterator[int]:
        return _generator(ctx, x)

    with pytest.raises(TypeError, match="generator function"):
        rt.handler("gen")(wrapper)


def test_an_async_generator_handler_is_refused(rt: Runtime) -> None:
    async def agen(ctx: Any, _: Any) -> Any:
        yield 1

    with pytest.raises(TypeError, match="'ag' is a generator function"):
        rt.handler("ag")(agen)


def test_an_async_handler_is_accepted(rt: Runtime) -> None:
    rt.handler("co")(_coroutine)
    assert rt.invoke("co") is None


def test_a_coroutine_closure_in_a_sync_handler_says_to_make_it_async(
    rt: Runtime, backend: MemoryBackend
) -> None:
    async def send() -> str:
        return "sent"

    @rt.handler("h")
    def h(ctx: Context, which: str) -> Any:
        fn: Any = send if which == "function" else (lambda: send())
        return ctx.run(fn, name="send", max_retry_attempts=3)

    for which in ("function", "lambda"):
        with pytest.raises(ContextMisuseError, match="make the handler `async def`"):
            rt.invoke("h", which, invocation_id=which)
        assert backend.read_entries(which) == []
