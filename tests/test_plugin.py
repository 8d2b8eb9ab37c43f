"""The pytest plugin (runjournal._pytest_plugin): fixtures and simulated crashes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from runjournal.backends import MemoryBackend, MemoryStore
from runjournal.context import Context, Runtime, is_testing, set_testing
from runjournal.context.testing import CrashingBackend, SimulatedCrash, crash_and_rerun
from runjournal.journal import JournalBackend
from runjournal.journal.testing import JournalBackendTests, Opener, make_entry, make_invocation

pytest_plugins = ["pytester"]


@pytest.fixture
def waits_on() -> Iterator[None]:
    """Run with retry waits on, whatever the process-wide switch was."""
    was = is_testing()
    set_testing(False)
    yield
    set_testing(was)


USER_TESTS = """
import time

import pytest

from runjournal.backends import MemoryBackend
from runjournal.context import TerminalError, is_testing
from runjournal.context.testing import CrashReport, SimulatedCrash

calls = []


def step(name, value):
    def closure():
        calls.append(name)
        return value
    return closure


def process(ctx, order):
    ctx.run(step("reserve", "r-1"), name="reserve")
    charge = ctx.run(step("charge", "c-1"), name="charge")
    ship = ctx.run(step("ship", "s-1"), name="ship")
    return {"order": order["id"], "charge": charge, "ship": ship}


@pytest.fixture(autouse=True)
def fresh_calls():
    calls.clear()


@pytest.fixture
def rt(runjournal_runtime):
    runjournal_runtime.handler("orders.process")(process)
    return runjournal_runtime


def test_a_fresh_memory_journal_per_test(rt, runjournal_backend):
    assert isinstance(runjournal_backend, MemoryBackend)
    assert rt.backend is runjournal_backend
    assert list(runjournal_backend.list_invocations()) == []
    rt.invoke("orders.process", {"id": 1}, invocation_id="only-here")
    assert list(runjournal_backend.list_invocations()) == ["only-here"]


def test_and_the_next_test_gets_another(runjournal_backend):
    assert list(runjournal_backend.list_invocations()) == []


def test_retries_do_not_wait(runjournal_runtime):
    attempts = []

    def flaky():
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise ConnectionError("down")
        return "up"

    @runjournal_runtime.handler("flaky")
    def handler(ctx, _):
        return ctx.run(flaky, name="flaky", initial_retry_interval=1.0)

    assert is_testing()
    assert runjournal_runtime.invoke("flaky") == "up"
    assert len(attempts) == 4 and attempts[-1] - attempts[0] < 0.5


def test_crash_after_the_charge_is_durable(rt, runjournal_crash):
    report = runjournal_crash("orders.process", {"id": 7}, step="charge")
    assert isinstance(report, CrashReport)
    assert report.crash.durable and report.crash.entry.name == "charge"
    assert [e.name for e in report.first_run] == ["reserve", "charge"]
    assert report.called_again == ()
    assert report.replayed == (0, 1)
    assert [e.name for e in report.resumed] == ["ship"]
    assert calls == ["reserve", "charge", "ship"]
    assert report.output == {"order": 7, "charge": "c-1", "ship": "s-1"}
    assert rt.invoke("orders.process", {"id": 7}, invocation_id=report.invocation_id) == (
        report.output
    )


def test_crash_before_the_charge_is_recorded(rt, runjournal_crash):
    report = runjournal_crash("orders.process", {"id": 8}, step=1, lose_entry=True)
    assert not report.crash.durable
    assert [e.name for e in report.called_again] == ["charge"]
    assert report.replayed == (0,)
    assert calls == ["reserve", "charge", "charge", "ship"]


def test_a_step_never_reached_fails_the_test(rt, runjournal_crash):
    runjournal_crash("orders.process", {"id": 9}, step="refund")


def test_zz_waits_are_back_after_the_fixtures():
    assert not is_testing()
"""


def test_users_get_fixtures_and_crash_helpers(pytester: pytest.Pytester, waits_on: None) -> None:
    pytester.makepyfile(test_user_handlers=USER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_a_step_never_reached_fails_the_test*",
            "*AssertionError: invocation 'crash-test-*' finished without reaching step "
            "'refund', so no crash was simulated; it journaled: journal index 0 ('reserve' run),"
            " journal index 1 ('charge' run), journal index 2 ('ship' run)",
        ]
    )
    assert not is_testing()


def test_the_plugin_is_loaded_by_its_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_registered(request):
            plugin = request.config.pluginmanager.get_plugin("runjournal")
            assert plugin is not None and plugin.__name__ == "runjournal._pytest_plugin"
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    pytester.runpytest("-p", "no:cacheprovider", "-p", "no:runjournal").assert_outcomes(failed=1)


# -- the crash machinery outside the fixtures ---------------------------------------


def _order_handler(rt: Runtime, calls: list[str], *, swallow: bool = False) -> None:
    @rt.handler("orders")
    def handler(ctx: Context, order: int) -> list[str]:
        out = []
        for name in ("a", "b", "c"):

            def closure(name: str = name) -> str:
                calls.append(name)
                return f"{name}-{order}"

            try:
                out.append(ctx.run(closure, name=name))
            except Exception:  # a handler that swallows errors must not swallow a crash
                if not swallow:
                    raise
        return out


def test_crash_and_rerun_works_on_a_runtime_of_ones_own(waits_on: None) -> None:
    calls: list[str] = []
    backend = MemoryBackend()
    rt = Runtime(backend)
    _order_handler(rt, calls, swallow=True)
    report = crash_and_rerun(rt, "orders", 5, step=0, invocation_id="mine")
    assert rt.backend is backend  # restored
    assert report.invocation_id == "mine"
    assert report.output == ["a-5", "b-5", "c-5"]
    assert calls == ["a", "b", "c"]
    assert [e.index for e in report.rerun] == [1, 2]
    assert report.called_again == ()


def test_after_a_crash_the_client_is_dead_and_a_restart_recovers() -> None:
    calls: list[str] = []
    crashing = CrashingBackend(MemoryBackend(), step="b", lose_entry=True)
    rt = Runtime(crashing)
    _order_handler(rt, calls, swallow=True)
    with pytest.raises(SimulatedCrash, match=r"while writing journal index 1 \('b' run\)") as info:
        rt.invoke("orders", 1, invocation_id="o-1")
    assert info.value is crashing.crashed and not info.value.durable
    assert calls == ["a", "b"]
    assert [e.name for e in crashing.lost] == ["b"]
    # A dead process does nothing more, whoever asks.
    with pytest.raises(SimulatedCrash):
        crashing.get_invocation("o-1")
    with pytest.raises(SimulatedCrash):
        crashing.append_entry("o-1", make_entry(2))
    assert [e.index for e in crashing.lost] == [1, 2]
    assert [e.index for e in crashing.inner.read_entries("o-1")] == [0]

    restarted = Runtime(crashing.inner)
    _order_handler(restarted, calls)
    [result] = restarted.recover()
    assert result.output == ["a-1", "b-1", "c-1"]
    assert calls == ["a", "b", "b", "c"]


def test_a_durable_crash_keeps_the_entry_and_refuses_the_next() -> None:
    crashing = CrashingBackend(MemoryBackend(), step=1)
    crashing.create_invocation(make_invocation("x"))
    crashing.append_entry("x", make_entry(0))
    with pytest.raises(SimulatedCrash, match=r"right after journal index 1 .* durable"):
        crashing.append_entry("x", make_entry(1))
    with pytest.raises(SimulatedCrash, match=r"right after journal index 1 .* durable"):
        crashing.append_entry("x", make_entry(2))
    assert [e.index for e in crashing.inner.read_entries("x")] == [0, 1]
    assert [e.index for e in crashing.appended] == [0, 1, 2]
    assert [e.index for e in crashing.lost] == [2]


def test_a_crash_in_a_run_async_thread_ends_the_whole_attempt(waits_on: None) -> None:
    calls: list[str] = []
    lock = threading.Lock()
    backend = MemoryBackend()
    rt = Runtime(backend)

    def step(name: str, after: int | None = None) -> Callable[[], str]:
        def closure() -> str:
            # Ordered, so the test does not depend on thread timing: "b"
            # finishes only once "a" is durable.
            deadline = time.monotonic() + 10
            while after is not None and not backend.read_entries("fan", start=after):
                assert time.monotonic() < deadline, "step a was never journaled"
                time.sleep(0.001)
            with lock:
                calls.append(name)
            return name.upper()

        return closure

    @rt.handler("fan-out")
    def fan_out(ctx: Context, _: None) -> list[str]:
        a = ctx.run_async(step("a"), name="a")
        b = ctx.run_async(step("b", after=0), name="b")
        ctx.wait_first(a, b)
        done = [a.result(), b.result()]  # the crash of b's thread surfaces here
        return [*done, ctx.run(step("c"), name="c")]

    try:
        report = crash_and_rerun(rt, "fan-out", step="b", lose_entry=True, invocation_id="fan")
    finally:
        rt.close()
    assert report.output == ["A", "B", "C"]
    assert [e.name for e in report.called_again] == ["b"]
    assert "b" in [e.name for e in report.lost]
    assert sorted(calls) == ["a", "b", "b", "c"]


@pytest.mark.parametrize(("step", "error"), [(True, TypeError), (-1, ValueError), (1.0, TypeError)])
def test_crash_steps_are_indexes_or_names(step: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="step must be"):
        CrashingBackend(MemoryBackend(), step=step)  # type: ignore[arg-type]


class TestCrashingBackendIsATransparentJournal(JournalBackendTests):
    """Disarmed, the wrapper is a conforming engine: it changes nothing it forwards."""

    @pytest.fixture
    def open_backend(self) -> Opener:
        store = MemoryStore()
        return lambda: CrashingBackend(MemoryBackend(store))

    def corrupt_entry(self, backend: JournalBackend, invocation_id: str, index: int) -> None:
        assert isinstance(backend, CrashingBackend) and isinstance(backend.inner, MemoryBackend)
        slots = backend.inner.store.entries[invocation_id]
        slots[index] = slots[index][:-1] + bytes([slots[index][-1] ^ 0xFF])

    def corrupt_invocation(self, backend: JournalBackend, invocation_id: str) -> None:
        assert isinstance(backend, CrashingBackend) and isinstance(backend.inner, MemoryBackend)
        records = backend.inner.store.invocations
        records[invocation_id] = records[invocation_id][:-1] + bytes(
            [records[invocation_id][-1] ^ 0xFF]
        )
