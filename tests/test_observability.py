"""Logs that name the invocation, and OpenTelemetry spans (issue 13, items 3 and 4)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runjournal import AsyncContext, Context, MemoryBackend, RetryDetails, Runtime, TerminalError
from runjournal.context._log import FIELDS
from tests.conftest import FakeClock

ROOT = Path(__file__).resolve().parent.parent


# -- logs -------------------------------------------------------------------------------


def _flaky(fails: int) -> Any:
    calls = [0]

    def step() -> str:
        calls[0] += 1
        if calls[0] <= fails:
            raise ConnectionError("shipping API timed out")
        return "ok"

    return step


def test_every_record_carries_the_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    rt = Runtime(MemoryBackend(), clock=FakeClock())
    seen: list[RetryDetails] = []
    rt.on_retry = seen.append

    @rt.handler("orders.ship")
    def ship(ctx: Context, _: Any) -> str:
        return ctx.run(_flaky(2), name="ship")

    with caplog.at_level(logging.DEBUG, logger="runjournal"):
        assert rt.invoke("orders.ship", invocation_id="order-7") == "ok"
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2
    for number, record in enumerate(retries, start=1):
        assert "invocation 'order-7'" in record.getMessage()
        assert record.invocation_id == "order-7"  # type: ignore[attr-defined]
        assert record.handler == "orders.ship"  # type: ignore[attr-defined]
        assert record.step == "ship"  # type: ignore[attr-defined]
        assert record.index == 0  # type: ignore[attr-defined]
        assert record.attempt == number  # type: ignore[attr-defined]
    # Every record of the logger has every field, so a formatter may use any of them.
    for record in caplog.records:
        if record.name == "runjournal":
            assert all(hasattr(record, field) for field in FIELDS), record.getMessage()
    assert [(d.invocation_id, d.index, d.attempt) for d in seen] == [
        ("order-7", 0, 1),
        ("order-7", 0, 2),
    ]
    rt.close()


def test_a_formatter_can_name_the_invocation_of_any_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    formatter = logging.Formatter("%(invocation_id)s %(handler)s %(step)s %(message)s")
    rt = Runtime(MemoryBackend(), clock=FakeClock())

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        ctx.run(_flaky(1), name="flaky")
        raise RuntimeError("left pending")

    with caplog.at_level(logging.DEBUG, logger="runjournal"), pytest.raises(RuntimeError):
        rt.invoke("h", invocation_id="inv-1")
    lines = [formatter.format(r) for r in caplog.records if r.name == "runjournal"]
    assert any(line.startswith("inv-1 h flaky run 'flaky'") for line in lines), lines
    rt.close()


def test_recovery_warnings_name_the_invocation(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    seed = Runtime(backend, worker_id="seed")
    seed.handler("h")(lambda ctx, _: (_ for _ in ()).throw(RuntimeError("later")))
    with pytest.raises(RuntimeError):
        seed.invoke("h", invocation_id="stuck")
    rt = Runtime(backend)
    rt.handler("h")(lambda ctx, _: (_ for _ in ()).throw(RuntimeError("still down")))
    with caplog.at_level(logging.WARNING, logger="runjournal"):
        rt.recover()
    [record] = [r for r in caplog.records if "still pending" in r.getMessage()]
    assert "invocation 'stuck'" in record.getMessage()
    assert (record.invocation_id, record.handler) == ("stuck", "h")  # type: ignore[attr-defined]
    seed.close()
    rt.close()


# -- spans ------------------------------------------------------------------------------


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(exporter: InMemorySpanExporter) -> Iterator[Runtime]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = Runtime(MemoryBackend(), clock=FakeClock(), tracer_provider=provider)
    yield rt
    rt.close()


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def _orders(rt: Runtime) -> None:
    @rt.handler("orders.process")
    def process(ctx: Context, order: int) -> int:
        charged = ctx.run(_flaky(1), name="charge")
        fut = ctx.run_async(lambda: order * 2, name="ship")
        return len(charged) + fut.result()


def test_an_invocation_and_each_step_attempt_are_spans(
    traced: Runtime, exporter: InMemorySpanExporter
) -> None:
    _orders(traced)
    assert traced.invoke("orders.process", 5, invocation_id="order-5") == 12
    spans = _by_name(exporter.get_finished_spans())
    [invoke] = spans["invoke orders.process"]
    assert invoke.attributes is not None
    assert invoke.attributes["runjournal.invocation_id"] == "order-5"
    assert invoke.attributes["runjournal.handler"] == "orders.process"
    assert invoke.attributes["runjournal.resumed"] is False
    [retry] = [e for e in invoke.events if e.name == "runjournal.retry"]
    assert retry.attributes is not None
    assert retry.attributes["runjournal.step"] == "charge"
    assert retry.attributes["runjournal.attempt"] == 1
    assert retry.attributes["exception.type"] == "ConnectionError"
    charges = spans["run charge"]
    assert [s.attributes["runjournal.attempt"] for s in charges] == [1, 2]  # type: ignore[index]
    assert charges[0].status.status_code.name == "ERROR"
    [ship] = spans["run ship"]  # a future's closure, run in another thread
    for span in [*charges, ship]:
        assert span.parent is not None and span.parent.span_id == invoke.context.span_id
        assert span.attributes is not None
        assert span.attributes["runjournal.invocation_id"] == "order-5"
        assert span.attributes["runjournal.replayed"] is False
    assert ship.attributes is not None and ship.attributes["runjournal.index"] == 1


def test_replayed_steps_cost_no_span_unless_asked(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    backend = MemoryBackend()

    class Crash(BaseException):
        pass

    crash = [True]

    def handler(ctx: Context, _: Any) -> str:
        value = ctx.run(lambda: "one", name="one")
        if crash[0]:
            raise Crash
        return value + ctx.run(lambda: "two", name="two")

    first = Runtime(backend, worker_id="w", tracer_provider=provider)
    first.handler("h")(handler)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    crash[0] = False
    exporter.clear()
    quiet = Runtime(backend, worker_id="w", tracer_provider=provider)
    quiet.handler("h")(handler)
    assert quiet.invoke("h", invocation_id="inv") == "onetwo"
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["run two", "invoke h"]
    [invoke] = [s for s in exporter.get_finished_spans() if s.name == "invoke h"]
    assert invoke.attributes is not None and invoke.attributes["runjournal.resumed"] is True

    exporter.clear()
    verbose = Runtime(MemoryBackend(), tracer_provider=provider, trace_replays=True)
    verbose.handler("h")(handler)
    verbose.invoke("h", invocation_id="again")
    exporter.clear()
    verbose.invoke("h", invocation_id="again")  # completed: nothing runs, no span
    assert exporter.get_finished_spans() == ()
    for rt in (first, quiet, verbose):
        rt.close()


def test_replays_are_spans_when_asked(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    backend = MemoryBackend()
    rt = Runtime(backend, worker_id="w", tracer_provider=provider, trace_replays=True)
    stop = [True]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        value = ctx.run(lambda: "one", name="one")
        if stop[0]:
            raise RuntimeError("pending")
        return value

    with pytest.raises(RuntimeError):
        rt.invoke("h", invocation_id="inv")
    stop[0] = False
    exporter.clear()
    rt.invoke("h", invocation_id="inv")
    [replayed] = [s for s in exporter.get_finished_spans() if s.name == "run one"]
    assert replayed.attributes is not None and replayed.attributes["runjournal.replayed"] is True
    rt.close()


def test_async_handlers_are_traced_too(traced: Runtime, exporter: InMemorySpanExporter) -> None:
    @traced.handler("a")
    async def a(ctx: AsyncContext, _: Any) -> str:
        async def co() -> str:
            return "co"

        first = await ctx.run(co, name="co")
        second = await ctx.run(lambda: "plain", name="plain")
        return first + second

    assert asyncio.run(traced.ainvoke("a", invocation_id="x")) == "coplain"
    spans = _by_name(exporter.get_finished_spans())
    [invoke] = spans["invoke a"]
    for name in ("run co", "run plain"):
        [span] = spans[name]
        assert span.parent is not None and span.parent.span_id == invoke.context.span_id


def test_a_terminal_failure_marks_the_invocation_span(
    traced: Runtime, exporter: InMemorySpanExporter
) -> None:
    @traced.handler("h")
    def h(ctx: Context, _: Any) -> None:
        raise TerminalError("card declined")

    with pytest.raises(TerminalError):
        traced.invoke("h", invocation_id="x")
    [invoke] = exporter.get_finished_spans()
    assert invoke.status.status_code.name == "ERROR"


def test_tracing_off_makes_no_span(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = Runtime(MemoryBackend(), tracing=False, tracer_provider=provider)
    _orders(rt)
    rt.invoke("orders.process", 1)
    assert exporter.get_finished_spans() == ()
    rt.close()


def test_without_opentelemetry_nothing_is_imported_or_traced() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        from runjournal import MemoryBackend, Runtime
        rt = Runtime(MemoryBackend())
        rt.handler("h")(lambda ctx, x: ctx.run(lambda: x + 1, name="s"))
        assert rt.invoke("h", 1) == 2
        assert rt._tracing is None
        assert [m for m in sys.modules if m.startswith("opentelemetry")] == ["opentelemetry"]
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
