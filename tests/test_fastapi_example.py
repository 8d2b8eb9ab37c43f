"""Async handlers in a service: what the FastAPI example (examples/fastapi_orders.py)
ran into in runjournal, each checked in isolation."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
