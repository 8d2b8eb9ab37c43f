"""Durable retries in one process, on every engine (memory, LMDB, S3).

The retry budget survives a crash: attempts spent (and the first attempt's
start, for ``max_retry_duration``) are on the invocation record, so a
restarted worker goes on counting. A crash is simulated by a ``BaseException``
raised inside a closure (or a wait): it ends the attempt without journaling
anything, and a new Runtime with the same worker id, on a new client of the
same journal, is the restarted worker. The same scenarios with real processes
and SIGKILL are in test_retries_crash.py.

Also here: at-most-once steps and what they cost, ``retry_on``, ``jitter``,
``current_step()``, what the ``on_retry`` hook is told, and option validation.
"""

from __future__ import annotations

import datetime
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from runjournal import (
    Context,
    ContextMisuseError,
    InvocationStatus,
    RetryDetails,
    RunOptions,
    Runtime,
    StepInfo,
    StepInterrupted,
    TerminalError,
    current_step,
)
from runjournal.journal import (
    Capabilities,
    Entry,
    Invocation,
    JournalBackend,
    StepProgress,
)
from tests.conftest import FakeClock

Opener = Callable[[], JournalBackend]

#: The worker id every Runtime here runs under: a restarted worker takes its
#: invocations back at once.
WORKER = "retry-worker"

#: The default schedule: 50 ms doubling, capped at 2 s.
DEFAULT_DELAYS = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


class Crash(BaseException):
    """The process dying: ends the attempt at once, journals nothing, is never retried."""


class Closure:
    """A step closure that plays one outcome per call and records ``current_step()``.

    Outcomes: ``"fail"`` raises ConnectionError, ``"crash"`` raises :class:`Crash`,
    an exception is raised, anything else is returned. When they run out, it fails.
    """

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.seen: list[StepInfo] = []

    def __call__(self) -> Any:
        self.seen.append(current_step())
        outcome = self.outcomes.pop(0) if self.outcomes else "fail"
        if outcome == "fail":
            raise ConnectionError(f"gateway down (attempt {self.seen[-1].attempt})")
        if outcome == "crash":
            raise Crash
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @property
    def calls(self) -> int:
        return len(self.seen)

    @property
    def attempts(self) -> list[int]:
        return [info.attempt for info in self.seen]


class Counting:
    """A backend that forwards every call and counts them, per method and invocation."""

    def __init__(self, inner: JournalBackend) -> None:
        self.inner = inner
        self.calls: Counter[tuple[str, str]] = Counter()

    def count(self, method: str, invocation_id: str) -> int:
        return self.calls[method, invocation_id]

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        self.calls["create_invocation", invocation.id] += 1
        return self.inner.create_invocation(invocation)

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        self.calls["get_invocation", invocation_id] += 1
        return self.inner.get_invocation(invocation_id)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        self.calls["update_invocation", invocation.id] += 1
        return self.inner.update_invocation(invocation)

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        self.calls["read_entries", invocation_id] += 1
        return self.inner.read_entries(invocation_id, start)

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        self.calls["append_entry", invocation_id] += 1
        self.inner.append_entry(invocation_id, entry)

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        return self.inner.list_invocations(status)

    def delete_invocation(self, invocation_id: str) -> bool:
        return self.inner.delete_invocation(invocation_id)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def start(one_journal: Opener) -> Iterator[Callable[..., Runtime]]:
    """Starts a worker on a new client of the test's journal (the same id each time)."""
    made: list[Runtime] = []

    def make(**kwargs: Any) -> Runtime:
        kwargs.setdefault("clock", FakeClock())
        kwargs.setdefault("worker_id", WORKER)
        backend = kwargs.pop("backend", None) or one_journal()
        rt = Runtime(backend, **kwargs)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def one_step(rt: Runtime, fn: Callable[[], Any], name: str = "charge", **options: Any) -> None:
    """Register handler ``h``: one run of ``fn`` with ``options``, its value the output."""

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> Any:
        return ctx.run(fn, name=name, **options)


def progress_of(backend: JournalBackend, invocation_id: str, index: int = 0) -> StepProgress:
    stored = backend.get_invocation(invocation_id)
    assert stored is not None
    progress = stored.progress(index)
    assert progress is not None, stored.steps
    return progress


def rewind_first_start(backend: JournalBackend, invocation_id: str, seconds: float) -> None:
    """Make the step at index 0 look as if its first attempt started ``seconds`` earlier
    (the worker stayed down that long before its restart)."""
    stored = backend.get_invocation(invocation_id)
    assert stored is not None
    progress = progress_of(backend, invocation_id)
    earlier = attrs.evolve(progress, first_started_at=progress.first_started_at - seconds)
    backend.update_invocation(stored.with_progress(earlier))


# -- the attempt count is durable --------------------------------------------------------


def test_an_attempt_killed_midway_counts_against_max_retry_attempts(
    start: Callable[..., Runtime],
) -> None:
    step = Closure("fail", "crash", "fail", "fail", "fail")
    first = start()
    one_step(first, step, max_retry_attempts=2)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2]

    again = start()
    one_step(again, step, max_retry_attempts=2)
    with pytest.raises(TerminalError) as info:
        again.invoke("h", invocation_id="inv")
    # 1 + max_retry_attempts calls in all: the killed attempt was one of them.
    assert step.attempts == [1, 2, 3]
    message = str(info.value)
    assert "gave up after 3 attempts" in message
    assert "max_retry_attempts=2 exhausted" in message
    assert "ConnectionError: gateway down (attempt 3)" in message
    assert type(info.value) is TerminalError

    [entry] = again.backend.read_entries("inv")
    assert entry.failure is not None and entry.attempts == 3
    assert again.status("inv") is InvocationStatus.FAILED
    # A third worker replays the journaled failure without calling the closure.
    third = start()
    one_step(third, step, max_retry_attempts=2)
    with pytest.raises(TerminalError, match=re.escape(message)):
        third.invoke("h", invocation_id="inv")
    assert step.calls == 3


def test_the_attempt_number_goes_on_across_crashes_until_success(
    start: Callable[..., Runtime],
) -> None:
    step = Closure("fail", "crash", "fail", "crash", "fail", "paid")
    for _ in range(2):
        rt = start()
        one_step(rt, step)
        with pytest.raises(Crash):
            rt.invoke("h", invocation_id="inv")
    rt = start()
    one_step(rt, step)
    assert rt.invoke("h", invocation_id="inv") == "paid"
    assert step.attempts == [1, 2, 3, 4, 5, 6]
    [entry] = rt.backend.read_entries("inv")
    assert entry.attempts == 6 and entry.failure is None
    # Every attempt, in every worker, had the same step and the same key.
    assert {(i.invocation_id, i.index, i.name, i.idempotency_key) for i in step.seen} == {
        ("inv", 0, "charge", step.seen[0].idempotency_key)
    }


class CrashingSleep(FakeClock):
    """A fake clock whose sleep number ``crash_at`` (1-based) crashes the process."""

    def __init__(self, crash_at: int, check: Callable[[int], None]) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.check = check

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.check(len(self.sleeps))
        if len(self.sleeps) == self.crash_at:
            raise Crash


def test_a_failed_attempt_is_durable_before_the_wait(
    start: Callable[..., Runtime], one_journal: Opener
) -> None:
    observer = one_journal()
    seen: list[StepProgress] = []

    def check(sleeps: int) -> None:
        # While the retry waits, the journal already counts the failed attempts.
        progress = progress_of(observer, "inv")
        assert progress.attempts == sleeps
        assert progress.last_error is not None
        assert progress.last_error.message == f"gateway down (attempt {sleeps})"
        seen.append(progress)

    step = Closure("fail", "fail", "fail", "fail")
    first = start(clock=CrashingSleep(crash_at=2, check=check))
    one_step(first, step, max_retry_attempts=2)
    with pytest.raises(Crash):  # dies waiting before attempt 3
        first.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2] and len(seen) == 2
    assert seen[0].first_started_at == seen[1].first_started_at

    again = start()
    one_step(again, step, max_retry_attempts=2)
    with pytest.raises(TerminalError, match=r"gave up after 3 attempts \(max_retry_attempts=2"):
        again.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2, 3]


def test_a_crash_in_the_first_attempt_runs_it_again(start: Callable[..., Runtime]) -> None:
    """Without at_most_once, nothing is written before the first attempt: if its worker
    dies in it, it runs again (the cost of writing nothing on the success path)."""
    step = Closure("crash", "fail", "fail")
    first = start()
    one_step(first, step, max_retry_attempts=1)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    stored = first.backend.get_invocation("inv")
    assert stored is not None and stored.steps == ()

    again = start()
    one_step(again, step, max_retry_attempts=1)
    with pytest.raises(TerminalError, match="gave up after 2 attempts"):
        again.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 1, 2]


# -- max_retry_duration counts from the first attempt's journaled start ------------------

DURATION: dict[str, Any] = {
    "max_retry_duration": 10.0,
    "initial_retry_interval": 1.0,
    "retry_interval_factor": 1.0,
}


def test_the_first_attempts_start_is_journaled_in_wall_clock_time(
    start: Callable[..., Runtime],
) -> None:
    clock = FakeClock()
    step = Closure("fail", "crash")

    def slow_then(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            clock.now += 3.0  # each attempt takes 3 s of the fake clock
            return fn()

        return call

    first = start(clock=clock)
    one_step(first, slow_then(step), **DURATION)
    before = time.time()
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    after = time.time()
    progress = progress_of(first.backend, "inv")
    # Saved once the first attempt failed, as a wall-clock time: then minus the 3 s
    # the fake clock says the attempt took; the second attempt keeps it.
    assert before - 3.0 - 0.01 <= progress.first_started_at <= after - 3.0 + 0.01
    assert progress.attempts == 2


@pytest.mark.parametrize(
    ("down_for", "attempts_after_restart"),
    [
        (1.0, 9),  # restarted at once (after the 1 s wait): 10 s budget, attempts 1 s apart
        (8.0, 2),  # restarted 8 s after the first attempt: room for 2 more
        (20.0, 0),  # restarted after the budget: nothing runs again
    ],
)
def test_max_retry_duration_spans_a_restart(
    start: Callable[..., Runtime], down_for: float, attempts_after_restart: int
) -> None:
    step = Closure("fail", "crash")
    first = start()
    one_step(first, step, **DURATION)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2]
    rewind_first_start(first.backend, "inv", down_for)

    clock = FakeClock()
    again = start(clock=clock)
    one_step(again, step, **DURATION)
    with pytest.raises(TerminalError) as info:
        again.invoke("h", invocation_id="inv")
    assert step.calls == 2 + attempts_after_restart
    assert step.attempts == list(range(1, 3 + attempts_after_restart))
    assert "max_retry_duration=10.0s" in str(info.value)
    [entry] = again.backend.read_entries("inv")
    assert entry.failure is not None and entry.attempts == 2 + attempts_after_restart
    if attempts_after_restart == 0:
        # The killed attempt was the last one the budget allowed.
        assert isinstance(info.value, StepInterrupted)
        assert entry.failure.type_name.endswith(":StepInterrupted")
        assert "attempt 2" in str(info.value)
    else:
        assert "ConnectionError: gateway down" in str(info.value)
        assert clock.sleeps == [1.0] * (attempts_after_restart - 1)


def test_max_retry_duration_spent_while_down_after_a_failure_stops_the_step(
    start: Callable[..., Runtime],
) -> None:
    """The worker died waiting to retry and came back after the budget: no more attempts,
    and the terminal error names the last failure."""
    step = Closure("fail", "fail")
    first = start(clock=CrashingSleep(crash_at=1, check=lambda _: None))
    one_step(first, step, **DURATION)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    assert step.attempts == [1]
    rewind_first_start(first.backend, "inv", 30.0)

    again = start()
    one_step(again, step, **DURATION)
    with pytest.raises(TerminalError) as info:
        again.invoke("h", invocation_id="inv")
    assert step.calls == 1
    message = str(info.value)
    assert "max_retry_duration=10.0s exhausted" in message
    assert "ConnectionError: gateway down (attempt 1)" in message
    [entry] = again.backend.read_entries("inv")
    assert entry.failure is not None and entry.attempts == 1


# -- at most once ------------------------------------------------------------------------


def test_at_most_once_with_no_retries_left_journals_step_interrupted(
    start: Callable[..., Runtime],
) -> None:
    step = Closure("fail", "crash")
    then = Closure("crash", "done")
    caught: list[BaseException] = []

    def register(rt: Runtime) -> None:
        @rt.handler("h")
        def h(ctx: Context, _: Any) -> Any:
            try:
                ctx.run(step, name="charge", at_most_once=True, max_retry_attempts=1)
            except StepInterrupted as exc:
                caught.append(exc)
            return ctx.run(then, name="then")

    first = start()
    register(first)
    with pytest.raises(Crash):  # dies inside attempt 2, the last one
        first.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2]

    again = start()
    register(again)
    with pytest.raises(Crash):  # the step ended without a call; the next one dies
        again.invoke("h", invocation_id="inv")
    assert step.calls == 2 and len(caught) == 1
    [entry] = again.backend.read_entries("inv")
    assert entry.failure is not None and entry.attempts == 2
    assert entry.failure.type_name.endswith(":StepInterrupted")
    assert isinstance(caught[0], TerminalError)
    assert "attempt 2" in str(caught[0]) and "never finished" in str(caught[0])

    third = start()
    register(third)
    assert third.invoke("h", invocation_id="inv") == "done"
    # The replay raised the journaled StepInterrupted, with the same text.
    assert step.calls == 2 and len(caught) == 2
    assert type(caught[1]) is StepInterrupted and str(caught[1]) == str(caught[0])


def test_at_most_once_without_retries_fails_the_invocation(
    start: Callable[..., Runtime],
) -> None:
    step = Closure("crash")
    first = start()
    one_step(first, step, at_most_once=True, max_retry_attempts=0)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    again = start()
    one_step(again, step, at_most_once=True, max_retry_attempts=0)
    with pytest.raises(StepInterrupted, match="attempt 1"):
        again.invoke("h", invocation_id="inv")
    assert again.status("inv") is InvocationStatus.FAILED
    third = start()
    one_step(third, step, at_most_once=True, max_retry_attempts=0)
    with pytest.raises(StepInterrupted, match="attempt 1"):
        third.invoke("h", invocation_id="inv")
    assert step.calls == 1


def test_at_most_once_with_retries_left_runs_the_next_attempt_once(
    start: Callable[..., Runtime],
) -> None:
    step = Closure("fail", "crash", "paid", "never")
    first = start()
    one_step(first, step, at_most_once=True, max_retry_attempts=2)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    again = start()
    one_step(again, step, at_most_once=True, max_retry_attempts=2)
    assert again.invoke("h", invocation_id="inv") == "paid"
    assert step.attempts == [1, 2, 3]
    [entry] = again.backend.read_entries("inv")
    assert entry.attempts == 3 and entry.failure is None
    assert again.invoke("h", invocation_id="inv") == "paid"
    assert step.calls == 3


def test_a_step_that_succeeds_at_once_writes_nothing_but_its_entry(
    start: Callable[..., Runtime], one_journal: Opener
) -> None:
    backend = Counting(one_journal())
    rt = start(backend=backend)

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        return [ctx.run(Closure(f"v{i}"), name=f"s{i}", max_retry_attempts=3) for i in range(3)]

    assert rt.invoke("h", invocation_id="inv") == ["v0", "v1", "v2"]
    assert backend.count("append_entry", "inv") == 3
    assert backend.count("create_invocation", "inv") == 1
    assert backend.count("update_invocation", "inv") == 1  # completing the invocation


@pytest.mark.parametrize(
    ("outcomes", "attempts"),
    [(["paid"], 1), (["fail", "paid"], 2), (["fail", "fail", "fail", "paid"], 4)],
)
def test_at_most_once_costs_one_write_per_attempt(
    start: Callable[..., Runtime], one_journal: Opener, outcomes: list[str], attempts: int
) -> None:
    backend = Counting(one_journal())
    rt = start(backend=backend)
    step = Closure(*outcomes)

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> Any:
        ctx.run(lambda: "a", name="plain")
        return ctx.run(step, name="charge", at_most_once=True)

    assert rt.invoke("h", invocation_id="inv") == "paid"
    assert step.calls == attempts
    assert backend.count("append_entry", "inv") == 2
    # One start marker per attempt, and the completion.
    assert backend.count("update_invocation", "inv") == attempts + 1


# -- retry_on ----------------------------------------------------------------------------


class Declined(Exception):
    pass


def causes(exc: BaseException) -> Iterator[BaseException]:
    """What ``exc`` was raised from, and what that was raised from, and so on."""
    cause = exc.__cause__
    while cause is not None:
        yield cause
        cause = cause.__cause__


@pytest.mark.parametrize(
    "retry_on",
    [
        ConnectionError,
        (TimeoutError, ConnectionError),
        [ConnectionError],
        lambda exc: isinstance(exc, ConnectionError),
    ],
    ids=["class", "tuple", "list", "predicate"],
)
def test_retry_on_retries_what_it_accepts_and_fails_the_rest_at_once(
    start: Callable[..., Runtime], retry_on: Any
) -> None:
    step = Closure("fail", ConnectionResetError("reset"), Declined("card declined"), "never")
    clock = FakeClock()
    rt = start(clock=clock)
    one_step(rt, step, retry_on=retry_on)
    with pytest.raises(TerminalError) as info:
        rt.invoke("h", invocation_id="inv")
    assert step.calls == 3  # two accepted errors retried (a subclass too), then refused
    assert clock.sleeps == [0.05, 0.1]
    message = str(info.value)
    assert "retry_on rejects it" in message
    assert "Declined: card declined" in message
    assert "gave up after 3 attempts" in message
    assert any(isinstance(cause, Declined) for cause in causes(info.value))
    [entry] = rt.backend.read_entries("inv")
    assert entry.failure is not None and entry.attempts == 3
    # Journaled: a replay raises it without calling the closure.
    again = start()
    one_step(again, step, retry_on=retry_on)
    with pytest.raises(TerminalError, match=re.escape(message)):
        again.invoke("h", invocation_id="inv")
    assert step.calls == 3


def test_an_error_retry_on_rejects_at_the_first_attempt_writes_only_its_entry(
    start: Callable[..., Runtime], one_journal: Opener
) -> None:
    backend = Counting(one_journal())
    rt = start(backend=backend)
    step = Closure(ValueError("bad input"))
    one_step(rt, step, retry_on=lambda exc: "later" in str(exc))
    with pytest.raises(TerminalError, match=r"1 attempt \(not retried.*ValueError: bad input"):
        rt.invoke("h", invocation_id="inv")
    assert step.calls == 1
    assert backend.count("append_entry", "inv") == 1
    assert backend.count("update_invocation", "inv") == 1  # failing the invocation


def test_retry_on_never_makes_a_terminal_error_retryable(start: Callable[..., Runtime]) -> None:
    step = Closure(TerminalError("refunded already"), "never")
    rt = start()
    one_step(rt, step, retry_on=lambda exc: True)
    with pytest.raises(TerminalError, match="^refunded already$"):
        rt.invoke("h", invocation_id="inv")
    assert step.calls == 1


# -- jitter ------------------------------------------------------------------------------


def _sleeps(start: Callable[..., Runtime], seed: int, jitter: float) -> list[float]:
    clock = FakeClock()
    rt = start(clock=clock, rng=random.Random(seed))
    one_step(rt, Closure(*["fail"] * 8, "ok"), jitter=jitter)
    assert rt.invoke("h") == "ok"  # a new invocation id each time
    return clock.sleeps


@pytest.mark.parametrize("jitter", [0.25, 0.5, 1.0])
def test_jittered_delays_stay_within_bounds(start: Callable[..., Runtime], jitter: float) -> None:
    sleeps = _sleeps(start, seed=7, jitter=jitter)
    assert len(sleeps) == len(DEFAULT_DELAYS)
    for slept, delay in zip(sleeps, DEFAULT_DELAYS, strict=True):
        assert delay * (1 - jitter) - 1e-12 <= slept <= delay + 1e-12
    assert sleeps != pytest.approx(DEFAULT_DELAYS)  # it did jitter


def test_jitter_is_deterministic_with_a_seeded_rng(start: Callable[..., Runtime]) -> None:
    assert _sleeps(start, seed=11, jitter=0.5) == _sleeps(start, seed=11, jitter=0.5)
    assert _sleeps(start, seed=11, jitter=0.5) != _sleeps(start, seed=12, jitter=0.5)


def test_zero_jitter_keeps_the_exact_schedule(start: Callable[..., Runtime]) -> None:
    rng = random.Random(3)
    state = rng.getstate()
    clock = FakeClock()
    rt = start(clock=clock, rng=rng)
    one_step(rt, Closure(*["fail"] * 8, "ok"), jitter=0)
    assert rt.invoke("h", invocation_id="inv") == "ok"
    assert clock.sleeps == pytest.approx(DEFAULT_DELAYS)
    assert rng.getstate() == state  # nothing drawn


def test_the_hook_is_told_the_jittered_delay(start: Callable[..., Runtime]) -> None:
    details: list[RetryDetails] = []
    clock = FakeClock()
    rt = start(clock=clock, rng=random.Random(5), on_retry=details.append)
    one_step(rt, Closure("fail", "fail", "fail", "ok"), jitter=0.9)
    rt.invoke("h", invocation_id="inv")
    assert [d.next_delay for d in details] == clock.sleeps


# -- current_step() ----------------------------------------------------------------------


def test_current_step_describes_the_running_step(start: Callable[..., Runtime]) -> None:
    first, second = Closure("a"), Closure("fail", "fail", "b")
    rt = start()

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        return [ctx.run(first, name="first"), ctx.run(second)]

    assert rt.invoke("h", invocation_id="inv-1") == ["a", "b"]
    [a] = first.seen
    assert (a.invocation_id, a.index, a.name, a.attempt) == ("inv-1", 0, "first", 1)
    assert [(s.invocation_id, s.index, s.name) for s in second.seen] == [("inv-1", 1, None)] * 3
    assert second.attempts == [1, 2, 3]
    keys = {s.idempotency_key for s in second.seen}
    assert len(keys) == 1 and keys != {a.idempotency_key}
    assert re.fullmatch(r"rj-[0-9a-f]{32}", a.idempotency_key)

    # Another invocation of the same handler: other keys for the same indexes.
    first.outcomes, second.outcomes = ["a"], ["b"]
    assert rt.invoke("h", invocation_id="inv-2") == ["a", "b"]
    assert first.seen[1].invocation_id == "inv-2"
    assert first.seen[1].idempotency_key != a.idempotency_key
    assert second.seen[-1].idempotency_key not in keys


def test_the_key_is_the_same_on_a_replay_after_a_crash(start: Callable[..., Runtime]) -> None:
    step = Closure("crash", "paid")
    first = start()
    one_step(first, step)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    again = start()
    one_step(again, step)
    assert again.invoke("h", invocation_id="inv") == "paid"
    assert [s.attempt for s in step.seen] == [1, 1]  # nothing journaled before attempt 1
    assert step.seen[0].idempotency_key == step.seen[1].idempotency_key


def test_current_step_outside_a_closure_is_misuse(start: Callable[..., Runtime]) -> None:
    with pytest.raises(ContextMisuseError, match="outside a run closure"):
        current_step()
    rt = start()
    seen: list[BaseException] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        ctx.run(lambda: None, name="before")
        try:
            current_step()  # in the handler, between steps
        except ContextMisuseError as exc:
            seen.append(exc)
        return "ok"

    assert rt.invoke("h", invocation_id="inv") == "ok"
    assert len(seen) == 1


def test_a_thread_a_closure_starts_does_not_see_its_step(start: Callable[..., Runtime]) -> None:
    rt = start()
    seen: list[Any] = []

    def closure() -> str:
        def look() -> None:
            try:
                seen.append(current_step())
            except ContextMisuseError as exc:
                seen.append(exc)

        thread = threading.Thread(target=look)
        thread.start()
        thread.join(10)
        return current_step().idempotency_key

    one_step(rt, closure)
    rt.invoke("h", invocation_id="inv")
    assert len(seen) == 1 and isinstance(seen[0], ContextMisuseError)


def test_current_step_in_run_async_closures(start: Callable[..., Runtime]) -> None:
    rt = start()
    steps = [Closure("x"), Closure("fail", "y"), Closure("fail", "fail", "z")]

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> list[str]:
        ctx.run(lambda: None, name="first")
        futures = [ctx.run_async(step, name=f"f{i}") for i, step in enumerate(steps)]
        return [fut.result() for fut in futures]

    assert rt.invoke("h", invocation_id="inv") == ["x", "y", "z"]
    for i, step in enumerate(steps):
        assert step.attempts == list(range(1, i + 2))
        assert {(s.invocation_id, s.index, s.name) for s in step.seen} == {("inv", i + 1, f"f{i}")}
        assert len({s.idempotency_key for s in step.seen}) == 1
    assert len({step.seen[0].idempotency_key for step in steps}) == 3


def test_run_async_attempts_are_durable_across_a_crash(start: Callable[..., Runtime]) -> None:
    step = Closure("fail", "crash", "fail", "paid")

    def register(rt: Runtime) -> None:
        @rt.handler("h")
        def h(ctx: Context, _: Any) -> Any:
            return ctx.run_async(step, name="charge", max_retry_attempts=3).result()

    first = start()
    register(first)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    again = start()
    register(again)
    assert again.invoke("h", invocation_id="inv") == "paid"
    assert step.attempts == [1, 2, 3, 4]


# -- async def handlers ------------------------------------------------------------------


def async_step(rt: Runtime, step: Closure, kind: str, **options: Any) -> None:
    """Register handler ``h``, an ``async def`` running ``step`` as a coroutine closure
    (on the loop) or as a plain one (in a worker thread)."""

    async def coroutine() -> Any:
        return step()

    closure: Callable[[], Any] = coroutine if kind == "coroutine" else step

    @rt.handler("h")
    async def h(ctx: Any, _: Any) -> Any:
        return await ctx.run(closure, name="charge", **options)


@pytest.mark.parametrize("kind", ["coroutine", "plain"])
def test_async_handlers_keep_the_attempt_count_across_a_crash(
    start: Callable[..., Runtime], kind: str
) -> None:
    step = Closure("fail", "crash", "fail", "fail")
    first = start()
    async_step(first, step, kind, max_retry_attempts=2)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    again = start()
    async_step(again, step, kind, max_retry_attempts=2)
    with pytest.raises(TerminalError, match=r"gave up after 3 attempts \(max_retry_attempts=2"):
        again.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2, 3]
    assert {(i.invocation_id, i.index, i.name, i.idempotency_key) for i in step.seen} == {
        ("inv", 0, "charge", step.seen[0].idempotency_key)
    }


@pytest.mark.parametrize("kind", ["coroutine", "plain"])
def test_async_at_most_once_steps_are_not_run_again(
    start: Callable[..., Runtime], kind: str
) -> None:
    step = Closure("fail", "crash", "never")
    first = start()
    async_step(first, step, kind, at_most_once=True, max_retry_attempts=1)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="inv")
    again = start()
    async_step(again, step, kind, at_most_once=True, max_retry_attempts=1)
    with pytest.raises(StepInterrupted, match="attempt 2 started and never finished"):
        again.invoke("h", invocation_id="inv")
    assert step.attempts == [1, 2]


# -- the retry hook ----------------------------------------------------------------------


def test_the_retry_hook_is_told_the_invocation_and_index(start: Callable[..., Runtime]) -> None:
    details: list[RetryDetails] = []
    step = Closure("fail", "fail", "crash", "fail", "paid")

    def register(rt: Runtime) -> None:
        @rt.handler("h")
        def h(ctx: Context, _: Any) -> Any:
            ctx.run(lambda: 1, name="one")
            ctx.run(lambda: 2, name="two")
            return ctx.run(step, name="charge")

    first = start(on_retry=details.append)
    register(first)
    with pytest.raises(Crash):
        first.invoke("h", invocation_id="order-7")
    again = start(on_retry=details.append)
    register(again)
    assert again.invoke("h", invocation_id="order-7") == "paid"
    assert [(d.invocation_id, d.index, d.name, d.attempt) for d in details] == [
        ("order-7", 2, "charge", 1),
        ("order-7", 2, "charge", 2),
        ("order-7", 2, "charge", 4),
    ]
    assert all(isinstance(d.error, ConnectionError) for d in details)
    assert str(details[-1].error) == "gateway down (attempt 4)"


# -- option validation -------------------------------------------------------------------

BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"jitter": -0.1}, ValueError),
    ({"jitter": -1}, ValueError),
    ({"jitter": 1.5}, ValueError),
    ({"jitter": float("nan")}, ValueError),
    ({"jitter": True}, ValueError),
    ({"jitter": "0.2"}, ValueError),
    ({"jitter": None}, ValueError),
    ({"retry_on": 5}, TypeError),
    ({"retry_on": "ConnectionError"}, TypeError),
    ({"retry_on": ConnectionError("down")}, TypeError),
    ({"retry_on": ()}, TypeError),
    ({"retry_on": (ConnectionError, "TimeoutError")}, TypeError),
    ({"retry_on": int}, TypeError),
    ({"at_most_once": 1}, TypeError),
    ({"at_most_once": "yes"}, TypeError),
    ({"at_most_once": None}, TypeError),
    ({"max_retry_attempts": -1}, ValueError),
    ({"max_retry_attempts": 1.5}, ValueError),
    ({"max_retry_attempts": True}, ValueError),
    ({"initial_retry_interval": -1}, ValueError),
    ({"initial_retry_interval": "1s"}, TypeError),
    ({"initial_retry_interval": None}, TypeError),
    ({"max_retry_interval": float("nan")}, ValueError),
    ({"max_retry_interval": "2s"}, TypeError),
    ({"max_retry_interval": None}, TypeError),
    ({"max_retry_duration": -5}, ValueError),
    ({"max_retry_duration": datetime.timedelta(seconds=-1)}, ValueError),
    ({"max_retry_duration": "1m"}, TypeError),
    ({"retry_interval_factor": 0.5}, ValueError),
    ({"codec": "json"}, TypeError),
]


def _ids(case: tuple[dict[str, Any], type[Exception]]) -> str:
    [(option, value)] = case[0].items()
    return f"{option}={value!r}"


@pytest.mark.parametrize(("kwargs", "error"), BAD_OPTIONS, ids=map(_ids, BAD_OPTIONS))
def test_a_bad_option_value_is_refused_naming_the_option(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    [option] = kwargs
    with pytest.raises(error, match=rf"\b{option}\b"):
        RunOptions(**kwargs)


@pytest.mark.parametrize(("kwargs", "error"), BAD_OPTIONS, ids=map(_ids, BAD_OPTIONS))
def test_a_bad_option_keyword_is_refused_before_anything_runs(
    kwargs: dict[str, Any], error: type[Exception], backend: Any
) -> None:
    rt = Runtime(backend, clock=FakeClock())
    step = Closure("never")
    [option] = kwargs
    raised: list[BaseException] = []

    @rt.handler("h")
    def h(ctx: Context, _: Any) -> str:
        for run in (ctx.run, ctx.run_async):
            try:
                run(step, name="s", **kwargs)
            except Exception as exc:
                raised.append(exc)
        return "refused"

    try:
        assert rt.invoke("h", invocation_id="inv") == "refused"
    finally:
        rt.close()
    assert len(raised) == 2
    for exc in raised:
        assert isinstance(exc, error) and re.search(rf"\b{option}\b", str(exc)), exc
    assert step.calls == 0 and rt.backend.read_entries("inv") == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"jitter": 0},
        {"jitter": 1},
        {"jitter": 0.3},
        {"retry_on": ConnectionError},
        {"retry_on": [ConnectionError, TimeoutError]},
        {"retry_on": lambda exc: False},
        {"at_most_once": True},
        {"at_most_once": False},
        {"max_retry_attempts": 0},
        {"max_retry_duration": 0},
        {"max_retry_duration": datetime.timedelta(minutes=1)},
        {"initial_retry_interval": datetime.timedelta(milliseconds=10)},
    ],
    ids=repr,
)
def test_good_option_values_are_accepted(kwargs: dict[str, Any]) -> None:
    RunOptions(**kwargs)
