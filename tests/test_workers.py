"""Leases across real worker processes: many workers, SIGKILL, SIGSTOP, attach (issue 10).

Every worker is a separate Python process running tests/worker_child.py on one
journal (an LMDB directory, or a prefix of the session's moto S3 server).
Each step closure appends one line to a ledger file opened with O_APPEND, so
the ledger counts how many times each closure ran, whatever process ran it
and however it died. Workers report what their calls returned or raised
through files; every wait is bounded, and every process is killed at the end.

The in-process versions of these rules (ownership, fencing, recovery) are in
test_leases.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from runjournal import InvocationStatus, open_backend
from runjournal.journal import JournalBackend
from runjournal.journal.testing import make_invocation

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("worker_child.py")
#: The longest wait for anything a worker does (a bug fails the test, never hangs it).
LIMIT = 40.0


class Line(NamedTuple):
    """One ledger line: one call of one step closure."""

    inv: str
    step: int
    tag: str
    pid: int
    t: float


class Worker:
    """One worker process and where it reports."""

    def __init__(self, tag: str, proc: subprocess.Popen[bytes], report: Path, log: Path) -> None:
        self.tag = tag
        self.proc = proc
        self.report_path = report
        self.log_path = log
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def check_not_failed(self) -> None:
        code = self.proc.poll()
        if code not in (None, 0) and not self.killed:
            pytest.fail(f"worker {self.tag} exited with {code}:\n{self.stderr()}")

    def report(self, timeout: float = LIMIT) -> dict[str, Any]:
        """Wait for the worker to finish; what it reported."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {self.tag} did not finish in {timeout}s:\n{self.stderr()}")
        assert code == 0, f"worker {self.tag} exited with {code}:\n{self.stderr()}"
        report: dict[str, Any] = json.loads(self.report_path.read_text())
        return report


class Lab:
    """One journal, its ledger and event log, and the worker processes of one test."""

    def __init__(self, root: Path, url: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.url = url
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        self.ledger_path = root / "ledger.txt"
        self.events_path = root / "events.jsonl"
        self.workers: list[Worker] = []
        self._backend: JournalBackend | None = None

    def path(self, name: str) -> str:
        return str(self.root / name)

    def spawn(self, tag: str, **config: Any) -> Worker:
        config = {
            "url": self.url,
            "tag": tag,
            "ledger": str(self.ledger_path),
            "events": str(self.events_path),
            "report": self.path(f"{tag}.report.json"),
            **config,
        }
        config_path = self.root / f"{tag}.config.json"
        config_path.write_text(json.dumps(config))
        log = self.root / f"{tag}.stderr.txt"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=self.env,
            )
        worker = Worker(tag, proc, Path(config["report"]), log)
        self.workers.append(worker)
        return worker

    def ledger(self) -> list[Line]:
        if not self.ledger_path.exists():
            return []
        lines = []
        for text in _whole_lines(self.ledger_path):
            inv, step, tag, pid, t = text.split()
            lines.append(Line(inv, int(step), tag, int(pid), float(t)))
        return lines

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        found = [json.loads(line) for line in _whole_lines(self.events_path)]
        return [e for e in found if kind is None or e["event"] == kind]

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = LIMIT) -> None:
        """Poll ``condition`` until it holds; fail at once if a worker crashed."""
        deadline = time.monotonic() + timeout
        while not condition():
            for worker in self.workers:
                worker.check_not_failed()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.tag}:\n{w.stderr()}" for w in self.workers)
                pytest.fail(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.01)

    def wait_ready(self, *workers: Worker) -> None:
        tags = {w.tag for w in workers}
        self.wait(
            f"{sorted(tags)} to start",
            lambda: tags <= {e["tag"] for e in self.events("ready")},
        )

    def started(self, tag: str, inv: str, step: int) -> bool:
        return any((x.tag, x.inv, x.step) == (tag, inv, step) for x in self.ledger())

    def go(self, name: str = "go") -> None:
        Path(self.path(name)).write_text("")

    def kill(self, worker: Worker) -> float:
        """SIGKILL ``worker``; return the wall time just before."""
        worker.killed = True
        at = time.time()
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait(LIMIT)
        return at

    def stop(self, worker: Worker) -> float:
        """SIGSTOP ``worker`` (every thread: its heartbeat too) at a moment it holds no lock
        of the journal; return the wall time just before.

        A process stopped inside a write would keep holding LMDB's one writer lock (or, in
        the middle of a request, moto's lock of conditional writes) and every other worker
        would wait for it: if a probe write does not get through at once, the worker is
        continued and stopped again.
        """
        if self._backend is None:  # opened while nobody is stopped: opening may write
            self._backend = open_backend(self.url)
        for _ in range(20):
            at = time.time()
            os.kill(worker.pid, signal.SIGSTOP)
            self.wait(f"{worker.tag} to stop", lambda: _state(worker.pid) == "T")
            probe = Probe(self._backend)
            probe.start()
            probe.join(0.5)
            if not probe.is_alive():
                assert probe.error is None, probe.error
                return at
            os.kill(worker.pid, signal.SIGCONT)
            probe.join(LIMIT)
            time.sleep(0.05)
        pytest.fail(f"{worker.tag} could not be stopped outside a write to the journal")

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()  # SIGKILL ends a stopped process too
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(10)
        if self._backend is not None:
            self._backend.close()


class Probe(threading.Thread):
    """Writes one record (a completed invocation nobody recovers) to the journal."""

    def __init__(self, backend: JournalBackend) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.error: BaseException | None = None

    def run(self) -> None:
        record = make_invocation(
            f"probe-{uuid.uuid4().hex}",
            handler="probe",
            status=InvocationStatus.COMPLETED,
            output=b"null",
        )
        try:
            self.backend.create_invocation(record)
        except BaseException as exc:
            self.error = exc


def _whole_lines(path: Path) -> list[str]:
    """The lines of a file others append to, without a last line still being written."""
    text = path.read_text()
    return text.splitlines()[: text.count("\n")]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rpartition(b")")[2].split()[0].decode()


@pytest.fixture
def labs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Lab]]:
    """Makes a Lab on a fresh journal of an engine ("lmdb" or "s3"); kills its workers after."""
    made: list[Lab] = []

    def make(engine: str) -> Lab:
        root = tmp_path / f"lab-{len(made)}"
        root.mkdir()
        env: dict[str, str] = {}
        if engine == "lmdb":
            url = f"lmdb://{root / 'journal'}"
            # Created before the workers start: processes creating one new LMDB journal at
            # the same moment can fail in prepare_directory (a race of the LMDB engine).
            open_backend(url).close()
        else:
            server = request.getfixturevalue("moto")
            bucket = request.getfixturevalue("bucket")
            prefix = f"w-{uuid.uuid4().hex[:12]}"
            url = f"s3://{bucket}/{prefix}?endpoint_url={server.endpoint_url}&region=us-east-1"
            from runjournal.backends.s3.testing import DUMMY_ENV

            env = DUMMY_ENV  # the moto fixture set them here too; the workers need them
        lab = Lab(root, url, env)
        made.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in made:
            lab.close()


def _by_step(lines: list[Line]) -> dict[tuple[str, int], list[str]]:
    """Which workers ran each (invocation, step) closure, in ledger order."""
    runs: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for line in lines:
        runs[line.inv, line.step].append(line.tag)
    return runs


def _outputs(report: dict[str, Any]) -> dict[str, Any]:
    """What each invoke of a report returned; fails on any error."""
    found = {}
    for inv, result in report["invoke"].items():
        if inv.startswith("completed:"):
            continue
        assert "error" not in result, f"{report['tag']}: invoke {inv!r}: {result['error']}"
        found[inv] = result["output"]
    return found


# -- 1. many workers, exactly once ------------------------------------------------------


@pytest.mark.parametrize("ids", ["default", "explicit"])
@pytest.mark.parametrize(
    ("engine", "n_workers", "n_seeds", "n_own"),
    [("lmdb", 4, 6, 3), ("s3", 2, 3, 2)],
)
def test_many_workers_run_every_step_closure_exactly_once(
    labs: Callable[[str], Lab], engine: str, n_workers: int, n_seeds: int, n_own: int, ids: str
) -> None:
    """A seeding process starts invocations whose second step stalls; the workers start
    while they run, each calling recover(), running start_recovery() and invoking every
    invocation (the seeds and each other's, created by whoever comes first). The seeder is
    SIGKILLed mid-step while the workers' own invocations are in flight; the workers take
    its invocations over at once (default ids: its process is gone) or once its 2 s lease
    lapsed (explicit ids: they race to fence it).

    Every closure runs exactly once, except each seed's stalled step: once by the seeder,
    once by exactly one worker. Every invocation completes; every worker's invoke of every
    id returns the same output; nothing raises or logs a warning anywhere."""
    lab = labs(engine)
    steps = 3
    seeds = [f"seed-{i}" for i in range(n_seeds)]
    tags = [f"w{n}" for n in range(n_workers)]
    own = {tag: [f"{tag}-{j}" for j in range(n_own)] for tag in tags}
    every = seeds + [inv for ids in own.values() for inv in ids]

    explicit = ids == "explicit"
    lease = 2.0 if explicit else 30.0

    def worker_id(tag: str) -> str | None:
        return tag if explicit else None

    seeder = lab.spawn(
        "seed",
        worker_id=worker_id("seed"),
        lease=lease,
        invoke=seeds,
        steps=steps,
        hold_step=1,
        hold_file=lab.path("never"),
    )
    workers = []
    for n, tag in enumerate(tags):
        others = [inv for inv in every if inv not in own[tag]]
        random.Random(n).shuffle(others)
        workers.append(
            lab.spawn(
                tag,
                worker_id=worker_id(tag),
                lease=lease,
                go=lab.path("go"),
                start_recovery=0.1,
                recover=True,
                invoke=own[tag] + others,
                steps=steps,
                step_sleep=0.2,
                final_recover=True,
            )
        )
    lab.wait(
        "every seed to stall in its second step",
        lambda: all(lab.started("seed", inv, 1) for inv in seeds),
    )
    lab.wait_ready(*workers)
    lab.go()
    lab.wait(
        "every worker to be invoking and some of their steps to run",
        lambda: (
            len(lab.events("invoking")) >= n_workers + 1
            and sum(line.tag != "seed" for line in lab.ledger()) >= n_workers
        ),
    )
    assert not any(line.tag != "seed" and line.inv in seeds for line in lab.ledger())
    killed_at = lab.kill(seeder)
    reports = {worker.tag: worker.report() for worker in workers}

    # When the seeds were taken over: at once, or once the seeder's lease lapsed (it was
    # taken, or renewed, less than lease/3 before the kill), and not long after.
    took_over = min(x.t for x in lab.ledger() if x.inv in seeds and x.tag != "seed")
    if explicit:
        assert killed_at + 0.5 * lease <= took_over <= killed_at + lease + 2.0
    else:
        assert took_over <= killed_at + 3.0

    # Ledger: who ran each closure, how often.
    runs = _by_step(lab.ledger())
    assert set(runs) == {(inv, s) for inv in every for s in range(steps)}
    taker: dict[str, str] = {}
    for inv in seeds:
        assert runs[inv, 0] == ["seed"]
        assert runs[inv, 1][0] == "seed" and len(runs[inv, 1]) == 2, runs[inv, 1]
        taker[inv] = runs[inv, 1][1]
        assert taker[inv] in tags
        assert runs[inv, 2] == [taker[inv]]
    for tag in tags:
        for inv in own[tag]:
            [taker[inv]] = runs[inv, 0]
            for s in range(steps):
                assert runs[inv, s] == [taker[inv]], (inv, s, runs[inv, s])

    # Every worker's invoke of every id returned the journaled outcome.
    for inv in seeds:
        expected = [f"{inv}/0/seed"] + [f"{inv}/{s}/{taker[inv]}" for s in range(1, steps)]
        for tag in tags:
            assert _outputs(reports[tag])[inv] == expected
    for inv in every[n_seeds:]:
        expected = [f"{inv}/{s}/{taker[inv]}" for s in range(steps)]
        for tag in tags:
            assert _outputs(reports[tag])[inv] == expected

    for tag, report in reports.items():
        assert set(_outputs(report)) == set(every)
        # recover() ran while every invocation was held by a live worker: all skipped.
        for result in report["recover"]:
            assert result["error"] is None and result["skipped"], (tag, result)
        assert {r["id"] for r in report["recover"]} >= set(seeds)
        assert report["final_recover"] == []  # nothing left pending
        assert report["warnings"] == [], (tag, report["warnings"])


# -- 2. SIGKILL one worker mid-step -------------------------------------------------------


@pytest.mark.parametrize("by", ["invoke", "recovery"])
@pytest.mark.parametrize("ids", ["default", "explicit"])
def test_a_survivor_finishes_a_killed_workers_invocations_within_a_lease(
    labs: Callable[[str], Lab], ids: str, by: str
) -> None:
    """A victim runs three invocations, each stalled in its third step. A survivor waits
    for them: attached to each (by=invoke: three invoke calls, no recovery loop), or
    through start_recovery() (by=recovery). While the victim lives the survivor runs
    nothing; then the victim is SIGKILLed.

    default ids (one host): the survivor sees the process is gone and takes over at once,
    well inside the 30 s lease. explicit ids, lease 1 s: the survivor waits out the lease
    (the victim's heartbeat kept it alive past its first expiry) and takes over then, not
    long after. Either way only the stalled step runs twice."""
    lab = labs("lmdb")
    explicit = ids == "explicit"
    lease = 1.0 if explicit else 30.0
    invs = ["k-0", "k-1", "k-2"]
    common = {"lease": lease, "steps": 4, "step_sleep": 0.02}
    victim = lab.spawn(
        "victim",
        worker_id="victim" if explicit else None,
        invoke=invs,
        hold_step=2,
        hold_file=lab.path("never"),
        **common,
    )
    lab.wait(
        "the victim to stall in every invocation",
        lambda: all(lab.started("victim", inv, 2) for inv in invs),
    )
    waiting: dict[str, Any] = (
        {"invoke": invs} if by == "invoke" else {"start_recovery": 0.05, "wait_complete": invs}
    )
    survivor = lab.spawn(
        "survivor", worker_id="survivor" if explicit else None, **waiting, **common
    )
    lab.wait("the survivor to wait", lambda: bool(lab.events("invoking")))
    # Long enough for the victim's invocation leases (taken >= 1 lease ago in the explicit
    # case) to expire on their records: its heartbeat alone must keep them.
    time.sleep(1.5 * lease if explicit else 0.3)
    assert {line.tag for line in lab.ledger()} == {"victim"}
    killed_at = lab.kill(victim)
    report = survivor.report()

    runs = _by_step(lab.ledger())
    for inv in invs:
        assert runs[inv, 0] == ["victim"] and runs[inv, 1] == ["victim"]
        assert runs[inv, 2] == ["victim", "survivor"]
        assert runs[inv, 3] == ["survivor"]
    expected = {
        inv: [f"{inv}/0/victim", f"{inv}/1/victim", f"{inv}/2/survivor", f"{inv}/3/survivor"]
        for inv in invs
    }
    assert _outputs(report) == expected
    assert report["warnings"] == []

    took_over = min(line.t for line in lab.ledger() if line.tag == "survivor") - killed_at
    finished = max(r["t"] for r in report["invoke"].values()) - killed_at
    if by == "recovery":  # when the survivor saw them completed, not when it looked later
        finished = max(report["invoke"][f"completed:{inv}"]["t"] for inv in invs) - killed_at
    if explicit:
        # The victim renewed its liveness at most lease/3 before dying: its leases held
        # until >= 2/3 lease after the kill, and had lapsed 1 lease after it.
        assert 0.5 * lease <= took_over, took_over
        assert finished <= lease + 2.0, finished
    else:
        assert took_over < 3.0 and finished < 4.0, (took_over, finished)


# -- 3. LeaseLost in a stalled process -------------------------------------------------------


@pytest.mark.parametrize("new_owner", ["still-running", "finished"])
@pytest.mark.parametrize("engine", ["lmdb", "s3"])
def test_a_stalled_worker_loses_its_lease_and_returns_the_new_owners_output(
    labs: Callable[[str], Lab], engine: str, new_owner: str
) -> None:
    """A (lease 0.5 s) is SIGSTOPped inside its first step, heartbeat and all, past its
    lease; B takes the invocation over (fencing A) and runs it. Then A is continued.

    still-running: B is still inside its own run of the first step when A's closure
    returns, so A's outcome of that step is recorded first; A's next ctx operation raises
    LeaseLost (fenced) and starts no closure; B adopts A's recorded step and finishes.
    finished: B has completed the invocation; A's in-flight ctx.run finds its step
    recorded by B and raises LeaseLost (another worker finished it).
    Either way A runs no further closure and its invoke returns B's output."""
    lab = labs(engine)
    lease = 0.5
    a = lab.spawn(
        "a",
        worker_id="a",
        lease=lease,
        invoke=["inv"],
        steps=3,
        hold_step=0,
        hold_file=lab.path("release-a"),
    )
    b_holds = new_owner == "still-running"
    b = lab.spawn(
        "b",
        worker_id="b",
        lease=lease,
        go=lab.path("go"),
        recover=True,
        steps=3,
        hold_step=0 if b_holds else None,
        hold_file=lab.path("release-b"),
    )
    lab.wait("A to run its first step", lambda: lab.started("a", "inv", 0))
    lab.wait_ready(b)
    time.sleep(lease)  # A's heartbeat renews its liveness record (every lease/3)
    lab.stop(a)
    time.sleep(lease + 0.4)  # A's lease and liveness record lapse: it renews nothing
    lab.go()
    if b_holds:
        lab.wait("B to take over and run the first step", lambda: lab.started("b", "inv", 0))
    else:
        b_report = b.report()
    Path(lab.path("release-a")).write_text("")
    os.kill(a.pid, signal.SIGCONT)
    lab.wait("A to raise LeaseLost", lambda: bool(lab.events("lease_lost")))
    [lost] = lab.events("lease_lost")
    assert lost["tag"] == "a" and lost["invocation"] == "inv"
    if b_holds:
        assert lost["step"] == 1, lost  # its next ctx operation, not the one in flight
        assert "fenced" in lost["error"], lost
        Path(lab.path("release-b")).write_text("")
        b_report = b.report()
        expected = ["inv/0/a", "inv/1/b", "inv/2/b"]
    else:
        assert lost["step"] == 0, lost
        assert "another worker finished it" in lost["error"], lost
        expected = ["inv/0/b", "inv/1/b", "inv/2/b"]
    a_report = a.report()

    [recovered] = b_report["recover"]
    assert recovered["status"] == "completed" and recovered["error"] is None, recovered
    assert recovered["output"] == expected
    assert _outputs(a_report) == {"inv": expected}  # A's invoke returned B's output
    # A ran the first step only; B ran it too, and everything after.
    assert [(x.inv, x.step, x.tag) for x in lab.ledger()] == [
        ("inv", 0, "a"),
        ("inv", 0, "b"),
        ("inv", 1, "b"),
        ("inv", 2, "b"),
    ]
    assert any("was fenced" in w for w in a_report["warnings"]), a_report["warnings"]


# -- 4. attach ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["lmdb", "s3"])
def test_two_processes_invoking_one_id_run_it_once_and_return_the_same_output(
    labs: Callable[[str], Lab], engine: str
) -> None:
    """Two processes invoke one id at the same moment: one runs it, the other waits for
    its outcome; each closure runs once and both return the same output."""
    lab = labs(engine)
    config = {"go": lab.path("go"), "invoke": ["inv"], "steps": 3, "step_sleep": 0.3}
    p, q = lab.spawn("p", **config), lab.spawn("q", **config)
    lab.wait_ready(p, q)
    lab.go()
    reports = [p.report(), q.report()]

    lines = lab.ledger()
    runner = lines[0].tag
    assert [(x.inv, x.step, x.tag) for x in lines] == [("inv", s, runner) for s in range(3)]
    expected = [f"inv/{s}/{runner}" for s in range(3)]
    for report in reports:
        assert _outputs(report) == {"inv": expected}
        # Neither returned before the last step ran.
        assert report["invoke"]["inv"]["t"] >= lines[-1].t
        assert report["warnings"] == []
