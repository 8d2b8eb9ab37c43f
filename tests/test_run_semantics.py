"""DESIGN's semantics rules 1-6 for ctx.run / run_void, on the memory engine."""

from __future__ import annotations

import datetime
import logging
from collections import Counter
from typing import Any

import pytest

from runjournal.backends import MemoryBackend
from runjournal.context import (
    Context,
    ContextMisuseError,
    NonDeterminismError,
    RunOptions,
    Runtime,
    TerminalError,
    set_testing,
)
from runjournal.journal import CodecError, EntryKind, InvocationStatus, MsgpackCodec
from tests.conftest import FakeClock


class Crash(Exception):
    """Stands for the process dying between two steps."""


class Declined(TerminalError):
    def __init__(self, amount: int) -> None:
        super().__init__(f"card declined for {amount}")
        self.amount = amount


calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def counted(name: str, value: Any = None) -> Any:
    calls[name] += 1
    return value


# -- 1. position -----------------------------------------------------------------


def test_replay_with_a_renamed_step_raises_non_determinism(rt: Runtime) -> None:
    order = ["a", "b"]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        for name in order:
            ctx.run(lambda name=name: counted(name), name=name)
        raise Crash

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    order[:] = ["a", "c"]
    with pytest.raises(NonDeterminismError) as info:
        rt.invoke("h", invocation_id="x")
    message = str(info.value)
    assert "index 1" in message and "'b'" in message and "'c'" in message
    assert info.value.index == 1
    assert [e.name for e in rt.backend.read_entries("x")] == ["a", "b"]
    assert calls == {"a": 1, "b": 1}


def test_each_call_takes_the_next_index(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[int]:
        return [ctx.run(lambda i=i: i, name=f"s{i}") for i in range(5)]

    assert rt.invoke("h", invocation_id="x") == [0, 1, 2, 3, 4]
    entries = rt.backend.read_entries("x")
    assert [(e.index, e.kind, e.name) for e in entries] == [
        (i, EntryKind.RUN, f"s{i}") for i in range(5)
    ]


# -- 2. once successfully --------------------------------------------------------


def test_recorded_steps_are_not_called_again_after_a_crash(rt: Runtime) -> None:
    crash = [True]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        a = ctx.run(lambda: counted("a", "A"), name="a")
        b = ctx.run(lambda: counted("b", "B"), name="b")
        if crash[0]:
            crash[0] = False
            raise Crash
        c = ctx.run(lambda: counted("c", "C"), name="c")
        return [a, b, c]

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    assert rt.invoke("h", invocation_id="x") == ["A", "B", "C"]
    assert calls == {"a": 1, "b": 1, "c": 1}


def test_a_result_is_durable_before_run_returns(rt: Runtime, backend: MemoryBackend) -> None:
    seen: list[int] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        for i in range(3):
            ctx.run(lambda i=i: i, name=f"s{i}")
            # Read through a second client of the same store: no caching involved.
            seen.append(len(MemoryBackend(backend.store).read_entries(ctx.invocation_id)))

    rt.invoke("h", invocation_id="x")
    assert seen == [1, 2, 3]


def test_run_void_journals_and_skips_on_replay(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        assert ctx.run_void(lambda: counted("v", 42), name="v") is None
        raise Crash

    for _ in range(3):
        with pytest.raises(Crash):
            rt.invoke("h", invocation_id="x")
    assert calls == {"v": 1}
    assert rt.backend.read_entries("x")[0].payload == b"null"


# -- 3. same value first time and on replay --------------------------------------


def test_first_run_sees_the_decoded_journal_value(rt: Runtime) -> None:
    seen: list[Any] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        seen.append(ctx.run(lambda: {"t": (1, 2), "n": {3: "x"}}, name="v"))
        raise Crash

    for _ in range(2):
        with pytest.raises(Crash):
            rt.invoke("h", invocation_id="x")
    assert seen == [{"t": [1, 2], "n": {"3": "x"}}] * 2


def test_msgpack_codec_round_trips_bytes(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        value = ctx.run(lambda: {"raw": b"\x00\xff"}, name="v", codec=MsgpackCodec())
        assert value == {"raw": b"\x00\xff"}

    rt.invoke("h", invocation_id="x")
    assert rt.backend.read_entries("x")[0].codec == "msgpack"


# -- 4. retryable vs terminal ----------------------------------------------------


def test_terminal_error_is_journaled_and_replayed(rt: Runtime) -> None:
    caught: list[BaseException] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def pay() -> None:
            counted("pay")
            raise Declined(30)

        try:
            ctx.run(pay, name="pay")
        except Declined as exc:
            caught.append(exc)
        raise Crash

    for _ in range(2):
        with pytest.raises(Crash):
            rt.invoke("h", invocation_id="x")
    assert calls == {"pay": 1}
    assert [str(e) for e in caught] == ["card declined for 30"] * 2
    assert all(type(e) is Declined for e in caught)
    # The first run chains the original error; the replay has no original to chain.
    assert isinstance(caught[0].__cause__, Declined) and caught[1].__cause__ is None
    failure = rt.backend.read_entries("x")[0].failure
    assert failure is not None and failure.type_name.endswith(":Declined")


def test_retryable_errors_back_off_exponentially(rt: Runtime, clock: FakeClock) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        def flaky() -> str:
            calls["flaky"] += 1
            if calls["flaky"] <= 8:
                raise ConnectionError("try later")
            return "ok"

        return ctx.run(flaky, name="flaky")  # type: ignore[no-any-return]

    assert rt.invoke("h") == "ok"
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])


def test_custom_retry_schedule_accepts_timedelta(rt: Runtime, clock: FakeClock) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def always() -> None:
            raise OSError("down")

        ctx.run(
            always,
            name="s",
            max_retry_attempts=4,
            initial_retry_interval=datetime.timedelta(milliseconds=100),
            retry_interval_factor=3,
            max_retry_interval=datetime.timedelta(seconds=1),
        )

    with pytest.raises(TerminalError):
        rt.invoke("h")
    assert clock.sleeps == pytest.approx([0.1, 0.3, 0.9, 1.0])


def test_exhausted_attempts_become_a_journaled_terminal_error(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def boom() -> None:
            counted("boom")
            raise ValueError("bad gateway")

        ctx.run(boom, name="ship", max_retry_attempts=2)

    with pytest.raises(TerminalError) as info:
        rt.invoke("h", invocation_id="x")
    message = str(info.value)
    assert "ValueError" in message and "bad gateway" in message
    assert "3 attempts" in message and "max_retry_attempts=2 exhausted" in message
    assert calls == {"boom": 3}
    assert rt.status("x") is InvocationStatus.FAILED
    entry = rt.backend.read_entries("x")[0]
    assert entry.attempts == 3 and entry.failure is not None
    with pytest.raises(TerminalError, match="bad gateway"):
        rt.invoke("h", invocation_id="x")
    assert calls == {"boom": 3}


def test_zero_retry_attempts_runs_once(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        ctx.run(lambda: counted("once") / 0, name="once", max_retry_attempts=0)

    with pytest.raises(TerminalError, match="ZeroDivisionError|TypeError"):
        rt.invoke("h")
    assert calls == {"once": 1}


def test_max_retry_duration_stops_retrying(rt: Runtime, clock: FakeClock) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def slow_fail() -> None:
            starts.append(clock.now)
            clock.now += 0.5
            raise TimeoutError("slow")

        ctx.run(slow_fail, name="f", max_retry_duration=2.0)

    starts: list[float] = []
    with pytest.raises(TerminalError, match="max_retry_duration=2.0s exhausted"):
        rt.invoke("h")
    # Each attempt takes 0.5 s; the next would start at 2.35 + 0.4 > 2 s.
    assert starts == pytest.approx([0.0, 0.55, 1.15, 1.85])


def test_each_run_has_its_own_budget(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        out = []
        for name in ["a", "b"]:

            def twice_failing(name: str = name) -> str:
                calls[name] += 1
                if calls[name] <= 2:
                    raise RuntimeError("flaky")
                return name

            out.append(ctx.run(twice_failing, name=name, max_retry_attempts=2))
        return out

    assert rt.invoke("h") == ["a", "b"]
    assert calls == {"a": 3, "b": 3}


def test_retries_are_logged_at_warning(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def flaky() -> None:
            calls["f"] += 1
            if calls["f"] == 1:
                raise ConnectionError("reset")

        ctx.run(flaky, name="ship")

    with caplog.at_level(logging.WARNING, logger="runjournal"):
        rt.invoke("h")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "'ship'" in text and "attempt 1" in text and "0.050s" in text and "reset" in text


def test_retry_hook_gets_details(backend: MemoryBackend, clock: FakeClock) -> None:
    details: list[Any] = []
    rt = Runtime(backend, clock=clock, on_retry=details.append)

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def flaky() -> None:
            calls["f"] += 1
            if calls["f"] < 3:
                raise ConnectionError("reset")

        ctx.run(flaky, name="ship")

    rt.invoke("h")
    assert [(d.name, d.attempt, d.next_delay) for d in details] == [
        ("ship", 1, 0.05),
        ("ship", 2, 0.1),
    ]
    assert isinstance(details[0].error, ConnectionError)


def test_testing_switch_removes_waits(rt: Runtime, clock: FakeClock) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def flaky() -> None:
            calls["f"] += 1
            if calls["f"] < 5:
                raise ConnectionError("reset")

        ctx.run(flaky, name="ship")

    set_testing(True)
    try:
        rt.invoke("h")
    finally:
        set_testing(False)
    assert calls["f"] == 5 and clock.sleeps == []


# -- 5. codec failures -----------------------------------------------------------


def test_unencodable_result_is_a_clear_error_and_not_retried(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        ctx.run(lambda: counted("s", object()), name="make-object")

    with pytest.raises(CodecError) as info:
        rt.invoke("h", invocation_id="x")
    message = str(info.value)
    assert "'make-object'" in message and "json" in message and "object" in message
    assert calls == {"s": 1}
    assert rt.backend.read_entries("x") == []
    assert rt.status("x") is InvocationStatus.PENDING


def test_codec_changed_since_recording_is_a_clear_error(rt: Runtime) -> None:
    codec: list[Any] = [None]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        opts = {} if codec[0] is None else {"codec": codec[0]}
        ctx.run(lambda: 1, name="s", **opts)
        raise Crash

    with pytest.raises(Crash):
        rt.invoke("h", invocation_id="x")
    codec[0] = MsgpackCodec()
    with pytest.raises(CodecError, match="journaled with codec 'json'.*'msgpack'"):
        rt.invoke("h", invocation_id="x")


def test_undecodable_bytes_are_a_clear_error(rt: Runtime) -> None:
    class Fussy:
        name = "fussy"

        def encode(self, value: Any) -> bytes:
            return b"\xff"

        def decode(self, data: bytes) -> Any:
            raise ValueError("cannot read that")

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        ctx.run(lambda: 1, name="s", codec=Fussy())

    with pytest.raises(CodecError, match=r"run 's'.*fussy.*cannot read that"):
        rt.invoke("h")


def test_pickle_is_not_a_fallback(rt: Runtime) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        ctx.run(lambda: {1, 2}, name="set", codec=MsgpackCodec())

    with pytest.raises(CodecError, match="msgpack.*set"):
        rt.invoke("h")


# -- 6. misuse -------------------------------------------------------------------


@pytest.mark.parametrize("op", ["run", "run_void"])
def test_ctx_inside_a_closure_is_refused_at_once(rt: Runtime, op: str) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def outer() -> None:
            counted("outer")
            getattr(ctx, op)(lambda: 1, name="inner")

        ctx.run(outer, name="outer")

    with pytest.raises(ContextMisuseError, match=rf"ctx\.{op}\(\) was called inside a run"):
        rt.invoke("h", invocation_id="x")
    assert calls == {"outer": 1}
    assert rt.backend.read_entries("x") == []


# -- options ---------------------------------------------------------------------


def test_options_object_and_keywords_combine(rt: Runtime) -> None:
    base = RunOptions(max_retry_attempts=1, initial_retry_interval=0.2)

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        def fail() -> None:
            counted("f")
            raise OSError("x")

        ctx.run(fail, name="f", options=base, max_retry_attempts=3)

    with pytest.raises(TerminalError, match="4 attempts"):
        rt.invoke("h")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_retry_attempt": 3}, "unknown run option.*max_retry_attempt"),
        ({"max_retry_attempts": -1}, "max_retry_attempts must be"),
        ({"initial_retry_interval": -0.1}, "initial_retry_interval must be >= 0"),
        ({"retry_interval_factor": 0.5}, "retry_interval_factor must be"),
        ({"max_retry_interval": "2s"}, "a duration must be"),
        ({"codec": "json"}, "codec must provide"),
    ],
)
def test_bad_options_are_named(rt: Runtime, kwargs: dict[str, Any], match: str) -> None:
    @rt.handler("h")
    def h(ctx: Context, _: Any) -> None:
        ctx.run(lambda: counted("never"), name="s", **kwargs)

    with pytest.raises((TypeError, ValueError), match=match):
        rt.invoke("h", invocation_id="x")
    assert calls == {} and rt.backend.read_entries("x") == []
