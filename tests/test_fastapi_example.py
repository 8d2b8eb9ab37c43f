"""Async handlers in a service: what the FastAPI example (examples/fastapi_orders.py)
ran into in runjournal, each checked in isolation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from runjournal import AsyncContext, MemoryBackend, Runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_async_context_steps_are_typed_by_their_closures(tmp_path: Path) -> None:
    """``await ctx.run(fn)`` / ``ctx.run_async(fn)`` have the type of ``fn``'s result,
    for coroutine closures as for plain ones, under ``mypy --strict`` (the example
    is type-checked, and copies of it will be)."""
    snippet = tmp_path / "typed_handler.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from typing_extensions import assert_type

            from runjournal import AsyncContext, AsyncRunFuture


            async def handler(ctx: AsyncContext, order: dict[str, str]) -> str:
                async def fetch() -> str:
                    return order["id"]

                def count() -> int:
                    return len(order)

                text = await ctx.run(fetch, name="fetch")
                number = await ctx.run(count, name="count")
                later = ctx.run_async(fetch, name="later")
                other = ctx.run_async(count)
                assert_type(text, str)
                assert_type(number, int)
                assert_type(later, AsyncRunFuture[str])
                assert_type(other, AsyncRunFuture[int])
                return text + await later + str(number + await other)
            """
        )
    )
    command = ["mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    checked = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("where", ["same-worker", "other-worker"])
def test_waiting_for_a_running_invocation_parks_no_thread(where: str) -> None:
    """Clients retrying an order while it runs (here, or on another worker) wait
    for its outcome; each waiting ``ainvoke`` must not hold one of the loop's
    default-executor threads meanwhile: with as many waiters as threads, the
    running attempt could never get one (``asyncio.to_thread`` in its closure, or
    runjournal's own reads and lease writes), and everything stalled until the
    waiters' timeout (forever without one)."""
    gate: list[asyncio.Event] = []

    async def gated(ctx: AsyncContext, _: Any) -> int:
        async def step() -> int:
            await gate[0].wait()
            return await asyncio.to_thread(lambda: 1)  # a closure using the loop's threads

        return await ctx.run(step, name="step")

    backend = MemoryBackend()
    runner = Runtime(backend, worker_id="runner")
    waiter = runner if where == "same-worker" else Runtime(backend, worker_id="waiter")
    for rt in {runner, waiter}:
        rt.handler("gated")(gated)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        gate.append(asyncio.Event())
        first = asyncio.create_task(runner.ainvoke("gated", None, invocation_id="order-1"))
        await asyncio.sleep(0.05)  # the runner holds the invocation
        waiting = [
            asyncio.create_task(waiter.ainvoke("gated", None, invocation_id="order-1"))
            for _ in range(4)
        ]
        await asyncio.sleep(0.1)
        gate[0].set()
        try:
            return await asyncio.wait_for(asyncio.gather(first, *waiting), timeout=5)
        finally:
            for rt in {runner, waiter}:
                await rt.aclose()

    assert asyncio.run(main()) == [1] * 5
