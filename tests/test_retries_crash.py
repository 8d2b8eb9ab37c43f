"""Durable retries across real processes: a worker is SIGKILLed inside a step's
closure, another process takes the invocation over at once and finishes it.

Each child (tests/retry_child.py) runs one step whose closure appends one
line per call to a ledger file (O_APPEND), so the ledger counts the calls made
by every process, including the killed one. On the attempt the test picks,
the closure creates a marker file and blocks; the parent SIGKILLs it there,
reaps it, and starts the next child. Engines: LMDB (files on disk, shared by
the processes) and S3 (the session's moto server, over HTTP). On LMDB the
children run under their default worker ids (the dead child's id names a
process of this host that is gone, so its lease is void at once); on S3 both
run under one chosen worker id (a restarted worker takes its invocations back
at once). Either way the restart must not wait for the 30 s lease: the child
gives up waiting after 15 s, failing the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runjournal import InvocationStatus, Runtime, TerminalError, open_backend
from runjournal.journal import JournalBackend

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("retry_child.py")
#: The longest the parent waits for anything a child does.
LIMIT = 30.0
INVOCATION = "order-1"


class Lab:
    """Starts children on one journal, kills them, reads what they left behind."""

    def __init__(self, tmp_path: Path, url: str, worker_id: str | None) -> None:
        self.dir = tmp_path
        self.url = url
        self.worker_id = worker_id
        self.ledger = tmp_path / "ledger.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, tag: str, mode: str = "invoke", **config: Any) -> subprocess.Popen[bytes]:
        """Start a child; ``config`` adds to or overrides its config (see retry_child.py)."""
        full = {
            "url": self.url,
            "worker_id": self.worker_id,
            "invocation_id": INVOCATION,
            "input": {"amount": 30},
            "ledger": str(self.ledger),
            "held": str(self.dir / f"{tag}.held"),
            "report": str(self.dir / f"{tag}.report.json"),
            "mode": mode,
            **config,
        }
        path = self.dir / f"{tag}.config.json"
        path.write_text(json.dumps(full))
        with open(self.dir / f"{tag}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(path)],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def log(self, tag: str) -> str:
        path = self.dir / f"{tag}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_when_held(self, tag: str, proc: subprocess.Popen[bytes]) -> None:
        """Wait until the child blocks inside its closure, then SIGKILL and reap it."""
        held = self.dir / f"{tag}.held"
        deadline = time.monotonic() + LIMIT
        while not held.exists():
            assert proc.poll() is None, f"child {tag} exited early:\n{self.log(tag)}"
            assert time.monotonic() < deadline, f"child {tag} never held:\n{self.log(tag)}"
            time.sleep(0.01)
        assert int(held.read_text()) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=LIMIT) == -signal.SIGKILL

    def report(self, tag: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """Wait for the child to finish; what it reported."""
        assert proc.wait(timeout=LIMIT) == 0, f"child {tag} failed:\n{self.log(tag)}"
        report: dict[str, Any] = json.loads((self.dir / f"{tag}.report.json").read_text())
        return report

    def calls(self) -> list[dict[str, Any]]:
        """One record per call of the step's closure, by any process."""
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines()]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=LIMIT)


@pytest.fixture(params=["lmdb", "s3"])
def journal(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str | None, Callable[[], JournalBackend]]]:
    """The journal's URL for the children, their worker id, and an opener for the parent."""
    opened: list[JournalBackend] = []
    if request.param == "lmdb":
        pytest.importorskip("lmdb")
        url = f"lmdb://{tmp_path / 'journal'}"
        worker_id = None
    else:
        moto = request.getfixturevalue("moto")
        bucket = request.getfixturevalue("bucket")
        prefix = f"crash-{uuid.uuid4().hex[:12]}"
        url = f"s3://{bucket}/{prefix}?endpoint_url={moto.endpoint_url}&region=us-east-1"
        worker_id = "retry-worker"

    def open_journal() -> JournalBackend:
        backend = open_backend(url)
        opened.append(backend)
        return backend

    yield url, worker_id, open_journal
    for backend in opened:
        backend.close()


@pytest.fixture
def lab(
    journal: tuple[str, str | None, Callable[[], JournalBackend]], tmp_path: Path
) -> Iterator[Lab]:
    url, worker_id, _ = journal
    lab = Lab(tmp_path, url, worker_id)
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def open_journal(journal: tuple[str, str | None, Callable[[], JournalBackend]]) -> Any:
    return journal[2]


def _one_key(calls: list[dict[str, Any]]) -> None:
    """Every call, in every process, ran the same step with the same idempotency key."""
    assert {(c["invocation"], c["index"], c["key"]) for c in calls} == {
        (INVOCATION, 0, calls[0]["key"])
    }


# -- the attempt count survives SIGKILL --------------------------------------------------


def test_a_retry_killed_midway_counts_against_max_retry_attempts(
    lab: Lab, open_journal: Callable[[], JournalBackend]
) -> None:
    options = {"max_retry_attempts": 2, "initial_retry_interval": 0.01}
    first = lab.start("first", options=options, hold_attempt=2)
    lab.kill_when_held("first", first)
    assert [c["attempt"] for c in lab.calls()] == [1, 2]

    second = lab.start("second", options=options)
    report = lab.report("second", second)
    assert report["error"]["type"] == "TerminalError", report
    message = report["error"]["message"]
    assert "gave up after 3 attempts (max_retry_attempts=2 exhausted)" in message
    assert "ConnectionError: gateway down (attempt 3)" in message

    # fn ran 1 + max_retry_attempts times in all, the killed attempt included.
    calls = lab.calls()
    assert [c["attempt"] for c in calls] == [1, 2, 3]
    assert [c["pid"] for c in calls] == [first.pid, first.pid, second.pid]
    _one_key(calls)

    backend = open_journal()
    stored = backend.get_invocation(INVOCATION)
    assert stored is not None and stored.status is InvocationStatus.FAILED
    [entry] = backend.read_entries(INVOCATION)
    assert entry.failure is not None and entry.attempts == 3
    assert entry.failure.message == message

    # Journaled: a third worker (this process) replays it without calling anything.
    rt = Runtime(backend, worker_id="parent")
    rt.handler("pay")(lambda ctx, order: ctx.run(lambda: "charged here", name="charge"))
    with pytest.raises(TerminalError) as info:
        rt.invoke("pay", {"amount": 30}, invocation_id=INVOCATION)
    rt.close()
    assert str(info.value) == message
    assert len(lab.calls()) == 3


# Delays: 50 ms before attempt 2, then a minute (capped), so the restarted worker's
# attempt 3 is the last that fits in the budget.
DURATION = {"initial_retry_interval": 0.05, "retry_interval_factor": 1000, "max_retry_interval": 60}


def test_max_retry_duration_counts_from_the_first_attempt_across_a_restart(lab: Lab) -> None:
    options = {**DURATION, "max_retry_duration": 20}
    first = lab.start("first", options=options, hold_attempt=2)
    lab.kill_when_held("first", first)

    second = lab.start("second", options=options)
    report = lab.report("second", second)
    assert report["error"]["type"] == "TerminalError", report
    message = report["error"]["message"]
    assert "gave up after 3 attempts (max_retry_duration=20.0s exhausted)" in message
    assert "ConnectionError: gateway down (attempt 3)" in message
    calls = lab.calls()
    assert [c["attempt"] for c in calls] == [1, 2, 3]
    assert [c["pid"] for c in calls] == [first.pid, first.pid, second.pid]
    _one_key(calls)


def test_max_retry_duration_spent_while_no_worker_ran_the_step(
    lab: Lab, open_journal: Callable[[], JournalBackend]
) -> None:
    options = {**DURATION, "max_retry_duration": 1.0}
    first = lab.start("first", options=options, hold_attempt=2)
    lab.kill_when_held("first", first)
    # Restart once the budget, counted from the first attempt's start, has run out.
    started = lab.calls()[0]["at"]
    time.sleep(max(0.0, started + 1.2 - time.time()))

    second = lab.start("second", options=options)
    report = lab.report("second", second)
    # The killed attempt 2 counts as failed and none remains: nothing runs again.
    assert report["error"]["type"] == "StepInterrupted", report
    message = report["error"]["message"]
    assert "attempt 2 started and never finished" in message
    assert "max_retry_duration=1.0s exhausted" in message
    assert [c["attempt"] for c in lab.calls()] == [1, 2]

    backend = open_journal()
    [entry] = backend.read_entries(INVOCATION)
    assert entry.failure is not None and entry.failure.type_name.endswith(":StepInterrupted")
    assert entry.attempts == 2


# -- at most once ------------------------------------------------------------------------


def test_at_most_once_killed_with_no_retries_left_is_never_called_again(
    lab: Lab, open_journal: Callable[[], JournalBackend]
) -> None:
    options = {"at_most_once": True, "max_retry_attempts": 0}
    first = lab.start("first", options=options, hold_attempt=1, succeed_at=1)
    lab.kill_when_held("first", first)

    second = lab.start("second", mode="recover", options=options, succeed_at=1)
    report = lab.report("second", second)
    [result] = report["recovered"]
    assert result["invocation_id"] == INVOCATION and result["status"] == "failed", report
    assert result["error"]["type"] == "StepInterrupted"
    assert "attempt 1 started and never finished" in result["error"]["message"]
    calls = lab.calls()
    assert [(c["attempt"], c["pid"]) for c in calls] == [(1, first.pid)]

    backend = open_journal()
    stored = backend.get_invocation(INVOCATION)
    assert stored is not None and stored.status is InvocationStatus.FAILED
    [entry] = backend.read_entries(INVOCATION)
    assert entry.failure is not None and entry.failure.type_name.endswith(":StepInterrupted")
    assert entry.attempts == 1

    # The invocation's outcome is the journaled StepInterrupted, for any later caller.
    third = lab.start("third", options=options, succeed_at=1)
    report = lab.report("third", third)
    assert report["error"] == result["error"]
    assert len(lab.calls()) == 1


def test_at_most_once_killed_with_retries_left_runs_the_next_attempt_once(
    lab: Lab, open_journal: Callable[[], JournalBackend]
) -> None:
    options = {"at_most_once": True, "max_retry_attempts": 2, "initial_retry_interval": 0.01}
    first = lab.start("first", options=options, hold_attempt=1, succeed_at=2)
    lab.kill_when_held("first", first)

    second = lab.start("second", mode="recover", options=options, succeed_at=2)
    report = lab.report("second", second)
    [result] = report["recovered"]
    assert result["status"] == "completed", report
    assert result["output"] == "charged at attempt 2"
    calls = lab.calls()
    assert [(c["attempt"], c["pid"]) for c in calls] == [(1, first.pid), (2, second.pid)]
    _one_key(calls)

    backend = open_journal()
    [entry] = backend.read_entries(INVOCATION)
    assert entry.failure is None and entry.attempts == 2
    stored = backend.get_invocation(INVOCATION)
    assert stored is not None and stored.status is InvocationStatus.COMPLETED
