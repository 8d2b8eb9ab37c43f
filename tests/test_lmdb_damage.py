"""Damaged LMDB journals: refused with a clear error, or read exactly as written.

A journal is written once (several pages: branch, leaf and overflow pages, a
free list), then copied and damaged in seeded ways: truncations, zeroed and
random pages, single-bit flips over meta pages, keys and values. Each copy
is opened and read in full in a worker process, so a signal kills a worker,
never the test; the worker reports each case's outcome on a pipe, and a
dead worker is replaced and charged with the case it was on.

Every case must end in one of: opened and read exactly what was written;
``JournalCorrupt`` or ``BackendUnavailable`` naming the journal's path; or a
worker killed in LMDB by a page LMDB trusts, which ``verify()`` (the safe way
to find out first) must then report. Nothing may read a different journal.

Run as a script (``python tests/test_lmdb_damage.py worker ROOT EXPECTED``) it is
the worker: one JSON case per line in, one JSON outcome per line out.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import attrs

from runjournal.backends.lmdb import LMDBBackend, verify
from runjournal.backends.lmdb._pages import (
    META_BYTES,
    PageFile,
    TreeWalk,
    free_pages_of,
    newest,
    parse_meta,
)
from runjournal.journal import (
    BackendUnavailable,
    Entry,
    Failure,
    Invocation,
    InvocationStatus,
    JournalCorrupt,
)
from runjournal.journal.testing import make_entry, make_invocation

SEED = int(os.environ.get("RUNJOURNAL_DAMAGE_SEED", "14"))  # another seed: other cases
CASE_TIMEOUT = 30.0  # a worker silent this long on one case is stuck
WORKERS = 2
PAGE = 4096
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

Expected = dict[str, Any]


# -- the journal ---------------------------------------------------------------------


def write_journal(path: Path) -> Expected:
    """Write the journal every case starts from; return what reading it must give."""
    rnd = random.Random(SEED)
    records: dict[str, tuple[Invocation, list[Entry]]] = {}
    with LMDBBackend.open(path, map_size=64 << 10) as backend:
        for n in range(30):
            inv_id = f"inv-{n:03d}"
            stored, _ = backend.create_invocation(make_invocation(inv_id, created_at=1.0 + n))
            # Gaps are allowed: every fifth invocation skips index 2.
            indexes = [i for i in range(n % 9) if n % 5 or i != 2]
            entries = []
            for index in indexes:
                size = 5000 if rnd.random() < 0.1 else rnd.randint(10, 400)
                entry = make_entry(index, rnd.randbytes(size), created_at=2.0 + index)
                backend.append_entry(inv_id, entry)
                entries.append(entry)
            if n % 3 == 1:
                stored = backend.update_invocation(
                    attrs.evolve(stored, status=InvocationStatus.COMPLETED, output=b'"done"')
                )
            elif n % 3 == 2 and n % 2:
                stored = backend.update_invocation(
                    attrs.evolve(stored, status=InvocationStatus.FAILED, failure=Failure("E", "no"))
                )
            records[inv_id] = (stored, entries)
        for n in range(6):  # freed pages: a free list that is not empty
            gone = f"gone-{n}"
            backend.create_invocation(make_invocation(gone))
            for index in range(4):
                backend.append_entry(gone, make_entry(index, rnd.randbytes(300)))
            backend.delete_invocation(gone)
    lists = {
        str(status): sorted(i for i, (inv, _) in records.items() if status in (None, inv.status))
        for status in (None, *InvocationStatus)
    }
    return {"records": records, "lists": lists}


def read_journal(path: str) -> Expected:
    """Everything the journal at ``path`` holds, read through the engine."""
    with LMDBBackend.open(path, map_size=64 << 10) as backend:
        lists = {
            str(status): list(backend.list_invocations(status))
            for status in (None, *InvocationStatus)
        }
        ids = sorted(set(lists["None"]) | {f"inv-{n:03d}" for n in range(30)} | {"gone-0"})
        records: dict[str, tuple[Invocation, list[Entry]]] = {}
        for inv_id in ids:
            inv = backend.get_invocation(inv_id)
            entries = backend.read_entries(inv_id)
            if entries and backend.read_entries(inv_id, entries[-1].index) != entries[-1:]:
                return {"records": {}, "lists": {"read_entries(start)": "differs"}}
            if inv is not None or entries:
                records[inv_id] = (inv, entries)  # type: ignore[assignment]
    return {"records": records, "lists": lists}


def difference(expected: Expected, got: Expected) -> str | None:
    """What differs between two readings (None if nothing)."""
    if got["lists"] != expected["lists"]:
        return f"lists differ: {got['lists']}"
    if set(got["records"]) != set(expected["records"]):
        return f"ids differ: {sorted(set(got['records']) ^ set(expected['records']))}"
    for inv_id, (inv, entries) in expected["records"].items():
        if got["records"][inv_id][0] != inv:
            return f"{inv_id}: invocation differs"
        if got["records"][inv_id][1] != entries:
            return f"{inv_id}: entries differ: {[e.index for e in got['records'][inv_id][1]]}"
    return None


# -- where things are in data.mdb ----------------------------------------------------


@attrs.frozen
class Layout:
    """Where a data.mdb's pages, keys and values are."""

    size: int
    pages: int
    keys: list[tuple[int, int]]  # (offset, length) of each record's key
    values: list[tuple[int, int]]  # (offset, length) of each record's value
    used: list[int]  # pages of either tree


def layout_of(data: Path) -> Layout:
    fd = os.open(data, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        first = parse_meta(os.pread(fd, META_BYTES, 0), 0)
        second = parse_meta(os.pread(fd, META_BYTES, first.page_size), 1)
        meta = newest(first, second)
        pages = PageFile(fd, meta.page_size, size)
        seen: set[int] = set()
        free_pages_of(TreeWalk(pages, meta.free, meta.last_page, "free", True, seen))
        located: list[tuple[int, int, int, int]] = []
        walk = TreeWalk(pages, meta.main, meta.last_page, "main", seen=seen, locations=located)
        assert sum(1 for _ in walk.records()) > 100 and not walk.problems
    finally:
        os.close(fd)
    return Layout(
        size,
        size // PAGE,
        [(k, kn) for k, kn, _, _ in located],
        [(v, vn) for _, _, v, vn in located],
        sorted(seen),
    )


# -- the cases -----------------------------------------------------------------------


def make_cases(layout: Layout) -> list[dict[str, Any]]:
    """The seeded damage cases: each a kind and what to do to the file."""
    rnd = random.Random(SEED)
    size, pages = layout.size, layout.pages
    cases: list[dict[str, Any]] = []

    def add(kind: str, **how: Any) -> None:
        cases.append({"id": len(cases), "kind": kind, **how})

    for length in sorted(
        {0, 1, 100, PAGE - 1, PAGE, 2 * PAGE - 1, 2 * PAGE, 3 * PAGE, size // 2}
        | {size - PAGE, size - 1, size - 2 * PAGE, size - 10 * PAGE}
        | {rnd.randrange(2 * PAGE, size) for _ in range(7)}
        | {PAGE * rnd.randrange(2, pages) for _ in range(7)}
    ):
        add("truncate", length=length)
    zeroed = [0, 1, *rnd.sample(layout.used, min(30, len(layout.used)))]
    zeroed += rnd.sample(range(2, pages), 8)
    for page in zeroed:
        add("zero page", page=page)
    for page in [*rnd.sample(layout.used, min(20, len(layout.used))), 0, 1]:
        add("random page", page=page, seed=rnd.randrange(1 << 30))
    for _ in range(16):
        page = rnd.choice([0, 1])
        add("flip meta", bit=(page * PAGE + rnd.randrange(16, META_BYTES)) * 8 + rnd.randrange(8))
    for _ in range(80):
        offset, length = rnd.choice(layout.keys)
        add("flip key", bit=(offset + rnd.randrange(length)) * 8 + rnd.randrange(8))
    for _ in range(70):
        offset, length = rnd.choice(layout.values)
        add("flip value", bit=(offset + rnd.randrange(length)) * 8 + rnd.randrange(8))
    return cases


def damage(data: Path, case: dict[str, Any]) -> None:
    kind = case["kind"]
    with open(data, "r+b") as f:
        if kind == "truncate":
            f.truncate(case["length"])
        elif kind in ("zero page", "random page"):
            f.seek(case["page"] * PAGE)
            fill = random.Random(case.get("seed", 0)).randbytes(PAGE)
            f.write(bytes(PAGE) if kind == "zero page" else fill)
        else:
            byte, bit = divmod(case["bit"], 8)
            f.seek(byte)
            old = f.read(1)[0]
            f.seek(byte)
            f.write(bytes([old ^ (1 << bit)]))


# -- the worker ----------------------------------------------------------------------


def run_case(
    root: Path, template: Path, expected: Expected, case: dict[str, Any]
) -> dict[str, Any]:
    """Copy the journal, damage it, open and read it: the outcome."""
    journal = root / f"case-{case['id']}"
    journal.mkdir()
    shutil.copyfile(template / "data.mdb", journal / "data.mdb")
    damage(journal / "data.mdb", case)
    path = os.path.realpath(journal)
    try:
        got = read_journal(path)
    except (JournalCorrupt, BackendUnavailable) as exc:
        outcome = {"outcome": type(exc).__name__, "message": str(exc), "named": path in str(exc)}
    except Exception as exc:
        outcome = {"outcome": "other", "message": f"{type(exc).__name__}: {exc}"}
    else:
        diff = difference(expected, got)
        outcome = {"outcome": "identical" if diff is None else "different", "message": diff}
    shutil.rmtree(journal)
    return outcome


def worker_main(root: str, expected_file: str) -> None:
    with open(expected_file, "rb") as f:
        expected = pickle.load(f)
    template = Path(root) / "template"
    for line in sys.stdin:
        case = json.loads(line)
        outcome = run_case(Path(root), template, expected, case)
        sys.stdout.write(json.dumps(outcome) + "\n")
        sys.stdout.flush()


class Worker:
    """One worker process; replaced when a case kills it."""

    def __init__(self, root: Path, expected_file: Path) -> None:
        self.args = [sys.executable, str(HERE), "worker", str(root), str(expected_file)]
        self.process: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.process is None:
            self.process = subprocess.Popen(
                self.args,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self.process

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        answer: list[str] = []
        out = process.stdout
        reader = threading.Thread(target=lambda: answer.append(out.readline()))
        try:
            process.stdin.write(json.dumps(case) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            pass
        reader.start()
        reader.join(CASE_TIMEOUT)
        if answer and answer[0]:
            return json.loads(answer[0])  # type: ignore[no-any-return]
        if reader.is_alive():
            process.kill()
        code = process.wait()
        self.process = None
        if code < 0:
            return {"outcome": "signal", "signal": -code}
        return {"outcome": "hang" if reader.is_alive() else "worker exited", "code": code}

    def close(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(10)


# -- the test ------------------------------------------------------------------------


def test_damaged_journals_are_refused_or_read_exactly(tmp_path: Path) -> None:
    template = tmp_path / "template"
    expected = write_journal(template)
    assert difference(expected, read_journal(str(template))) is None
    expected_file = tmp_path / "expected.pickle"
    expected_file.write_bytes(pickle.dumps(expected))
    cases = make_cases(layout_of(template / "data.mdb"))
    assert len(cases) >= 200

    outcomes: dict[int, dict[str, Any]] = {}

    def drive(share: list[dict[str, Any]]) -> None:
        worker = Worker(tmp_path, expected_file)
        try:
            for case in share:
                outcomes[case["id"]] = worker.run(case)
        finally:
            worker.close()

    threads = [threading.Thread(target=drive, args=(cases[i::WORKERS],)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == len(cases)

    failures = []
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for case in cases:
        outcome = outcomes[case["id"]]
        kind = outcome["outcome"]
        if kind == "signal":
            # Killed in LMDB: verify() must have been able to tell first.
            report = verify(tmp_path / f"case-{case['id']}", timeout=60)
            kind = f"signal {outcome['signal']}, verify found it" if not report.ok else "signal"
            if report.ok:
                failures.append(f"{case}: worker killed by signal {outcome['signal']}, verify ok")
        elif kind in ("JournalCorrupt", "BackendUnavailable"):
            if not outcome["named"]:
                failures.append(f"{case}: {kind} does not name the path: {outcome['message']}")
        elif kind != "identical":
            failures.append(f"{case}: {outcome}")
        table[case["kind"]][kind] += 1
        if os.environ.get("RUNJOURNAL_DAMAGE_LOG"):
            print(case, outcome)
    summary = "\n".join(f"{kind:12} {dict(counts)}" for kind, counts in table.items())
    print(f"\n{len(cases)} damage cases:\n{summary}")
    assert not failures, "\n".join(failures) + "\n" + summary


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker_main(sys.argv[2], sys.argv[3])
