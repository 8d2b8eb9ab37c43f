"""The workloads and raw disk limits the benchmark suite measures."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import lmdb

from runjournal.context import AsyncContext, Context, RunOptions, Runtime
from runjournal.journal import JournalBackend

STEPS = 1000
W2_INVOCATIONS = 64
W2_STEPS = 10
PAYLOAD = "x" * 98  # JSON-encodes to 100 bytes

Opener = Callable[[], JournalBackend]


class _Crash(Exception):
    """Leaves an invocation pending after its steps are journaled."""


def raw_fsync(directory: Path, ops: int) -> float:
    """100-byte append + fsync loop on ``directory``'s disk; ops/s."""
    path = directory / "raw-fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    record = b"r" * 100
    try:
        start = time.perf_counter()
        for _ in range(ops):
            os.write(fd, record)
            os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return ops / elapsed


def raw_lmdb_commits(directory: Path, ops: int) -> float:
    """One 100-byte put per synced LMDB commit; commits/s."""
    env = lmdb.open(str(directory / "raw-lmdb"), map_size=64 << 20, sync=True, metasync=True)
    try:
        value = b"v" * 100
        start = time.perf_counter()
        for i in range(ops):
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), value)
        elapsed = time.perf_counter() - start
    finally:
        env.close()
    return ops / elapsed


def _steps_runtime(
    backend: JournalBackend,
    steps: int,
    crash: list[bool] | None = None,
    options: RunOptions | None = None,
) -> Runtime:
    rt = Runtime(backend, options=options)

    @rt.handler("bench.steps")
    def handler(ctx: Context, _: Any) -> float:
        for i in range(steps):
            ctx.run(lambda: PAYLOAD, name=f"s{i}")
        reached = time.perf_counter()
        if crash is not None and crash[0]:
            raise _Crash
        return reached

    return rt


def w1_sequential(open_backend: Opener) -> float:
    """W1: one invocation running 1000 sequential ``ctx.run`` steps; steps/s."""
    backend = open_backend()
    try:
        rt = _steps_runtime(backend, STEPS)
        start = time.perf_counter()
        rt.invoke("bench.steps", None)
        return STEPS / (time.perf_counter() - start)
    finally:
        backend.close()


def w1_at_most_once(open_backend: Opener) -> float:
    """W1 with ``at_most_once=True``: a start marker is journaled before every step."""
    backend = open_backend()
    try:
        rt = _steps_runtime(backend, STEPS, options=RunOptions(at_most_once=True))
        start = time.perf_counter()
        rt.invoke("bench.steps", None)
        return STEPS / (time.perf_counter() - start)
    finally:
        backend.close()


def _async_steps_runtime(backend: JournalBackend, steps: int) -> Runtime:
    rt = Runtime(backend)

    async def payload() -> str:
        return PAYLOAD

    @rt.handler("bench.async_steps")
    async def handler(ctx: AsyncContext, _: Any) -> None:
        for i in range(steps):
            await ctx.run(payload, name=f"s{i}")

    return rt


def w1_async(open_backend: Opener) -> float:
    """W1-async: one async invocation running 1000 sequential ``await ctx.run`` steps
    (coroutine closures); steps/s."""
    backend = open_backend()
    try:
        rt = _async_steps_runtime(backend, STEPS)

        async def main() -> float:
            start = time.perf_counter()
            await rt.ainvoke("bench.async_steps", None)
            return STEPS / (time.perf_counter() - start)

        try:
            return asyncio.run(main())
        finally:
            rt.close()
    finally:
        backend.close()


def w2_async(open_backend: Opener) -> float:
    """W2-async: 64 invocations x 10 steps, concurrently on one event loop; steps/s."""
    backend = open_backend()
    try:
        rt = _async_steps_runtime(backend, W2_STEPS)

        async def main() -> float:
            start = time.perf_counter()
            await asyncio.gather(
                *(rt.ainvoke("bench.async_steps", None) for _ in range(W2_INVOCATIONS))
            )
            return W2_INVOCATIONS * W2_STEPS / (time.perf_counter() - start)

        try:
            return asyncio.run(main())
        finally:
            rt.close()
    finally:
        backend.close()


def w2_concurrent(open_backend: Opener) -> float:
    """W2: 64 invocations x 10 steps, concurrently from threads; steps/s."""
    backend = open_backend()
    try:
        rt = _steps_runtime(backend, W2_STEPS)
        barrier = threading.Barrier(W2_INVOCATIONS + 1)
        errors: list[BaseException] = []

        def invoke() -> None:
            barrier.wait()
            try:
                rt.invoke("bench.steps", None)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=invoke) for _ in range(W2_INVOCATIONS)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        return W2_INVOCATIONS * W2_STEPS / elapsed
    finally:
        backend.close()


def w3_replay(open_backend: Opener) -> float:
    """W3: replay of a 1000-step journal, timed until the handler is past the
    last recorded step; replayed steps/s."""
    backend = open_backend()
    try:
        crash = [True]
        rt = _steps_runtime(backend, STEPS, crash)
        with suppress(_Crash):
            rt.invoke("bench.steps", None, invocation_id="w3")
        crash[0] = False
        start = time.perf_counter()
        reached: float = rt.invoke("bench.steps", None, invocation_id="w3")
        return STEPS / (reached - start)
    finally:
        backend.close()
