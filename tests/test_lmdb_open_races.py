"""Opening an LMDB journal while other processes grow it, or open it for the first time.

- One process keeps appending to a journal with a small map, so the map
  grows again and again, while other processes open the journal over and
  over: every open must succeed (``MDB_MAP_RESIZED`` in the set-up's first
  transaction is adopted and retried like anywhere else).
- Eight processes open one new path at the same moment, twenty times (and
  again on a filesystem without hard links, where the file is created in
  place): every open must succeed, and they all share one journal.
- A client of either engine used in a forked child is refused with one clear
  error.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runjournal.backends.lmdb import LMDBBackend
from runjournal.backends.s3 import S3Backend
from runjournal.journal import BackendUnavailable, InvocationStatus
from runjournal.journal.testing import make_entry, make_invocation

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0

GROWER = """
import os, sys, time
from runjournal.backends.lmdb import LMDBBackend
from runjournal.journal.testing import make_entry, make_invocation
path, start, done = sys.argv[1], float(sys.argv[2]), sys.argv[3]
backend = LMDBBackend.open(path, map_size=64 << 10, durable=False)
backend.create_invocation(make_invocation("grown"))
while time.time() < start:
    time.sleep(0.001)
# 4 MiB in 4 KiB entries: the map doubles from 64 KiB six times and more,
# and every append moves the last page on.
for index in range(1024):
    backend.append_entry("grown", make_entry(index, os.urandom(4096)))
print(backend.info().map_size)
backend.close()
open(done, "w").close()
"""

OPENER = """
import os, sys, time
from runjournal.backends.lmdb import LMDBBackend
path, start, done = sys.argv[1], float(sys.argv[2]), sys.argv[3]
while time.time() < start:
    time.sleep(0.001)
opened, failed = 0, []
while not os.path.exists(done):
    try:
        backend = LMDBBackend.open(path, map_size=64 << 10, durable=False)
        backend.get_invocation("grown")
        backend.read_entries("grown", 10**9)
        backend.close()
        opened += 1
    except Exception as exc:
        failed.append(f"{type(exc).__name__}: {exc}")
print(opened, len(failed))
for line in failed[:5]:
    print(line)
"""


def _python(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_opens_succeed_while_another_process_grows_the_map(tmp_path: Path) -> None:
    opened = 0
    for round_ in range(2):
        path = tmp_path / f"j{round_}"
        done = tmp_path / f"done{round_}"
        LMDBBackend.open(path, map_size=64 << 10).close()
        start = time.time() + 0.5
        grower = _python(GROWER, path, start, done)
        openers = [_python(OPENER, path, start, done) for _ in range(3)]
        out, err = grower.communicate(timeout=WAIT)
        assert grower.returncode == 0, err
        assert int(out) >= 4 << 20, "the map did not grow several times"
        for opener in openers:
            out, err = opener.communicate(timeout=WAIT)
            assert opener.returncode == 0, err
            counts, *failures = out.splitlines()
            ok, failed = map(int, counts.split())
            assert failed == 0, "\n".join(failures)
            opened += ok
    assert opened >= 20  # the opens did overlap the growth, many times


# -- many processes opening one new path at once ---------------------------------------

FIRST_OPENER = """
import os, sys, time
if sys.argv[1] == "nolink":
    def no_link(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted (no hard links here)")
    os.link = no_link
from runjournal.backends.lmdb import LMDBBackend
from runjournal.journal.testing import make_invocation
me = sys.argv[2]
for line in sys.stdin:
    path, start = line.split()
    while time.time() < float(start):
        pass  # spin: the processes start within microseconds of each other
    try:
        backend = LMDBBackend.open(path)
        backend.create_invocation(make_invocation(me))
        backend.close()
        print("ok", flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}".replace("\\n", " "), flush=True)
"""


def _first_opens(tmp_path: Path, mode: str, rounds: int, processes: int = 8) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_OPENER, mode, f"p{n}"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    failures = []
    try:
        for round_ in range(rounds):
            # The parent directory is new too: the processes race to create it.
            path = tmp_path / mode / f"round-{round_}" / "journal"
            start = time.time() + 0.05
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write(f"{path} {start}\n")
                worker.stdin.flush()
            for worker in workers:
                assert worker.stdout is not None
                answer = worker.stdout.readline().strip()
                if answer != "ok":
                    failures.append(f"round {round_}: {answer}")
            if not failures:
                with LMDBBackend.open(path) as backend:
                    ids = list(backend.list_invocations(InvocationStatus.PENDING))
                assert ids == [f"p{n}" for n in range(processes)]  # one journal for all
                assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
    finally:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(WAIT)
    assert not failures, "\n".join(failures)


def test_eight_processes_open_one_new_path_at_once(tmp_path: Path) -> None:
    _first_opens(tmp_path, "link", rounds=20)


def test_eight_processes_open_one_new_path_at_once_without_hard_links(tmp_path: Path) -> None:
    _first_opens(tmp_path, "nolink", rounds=10)


# -- forked children -------------------------------------------------------------------


class _NoCalls:
    """A stand-in S3 client: the child must be refused before any request."""

    meta = None  # read by repr()

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the client was used: {name}")


def _use_in_child(backend: Any, queue: Any) -> None:
    try:
        backend.get_invocation("x")
        queue.put("used")
    except BackendUnavailable as exc:
        backend.close()  # closing in the child touches nothing of the parent's
        queue.put(str(exc))


@pytest.mark.parametrize("engine", ["lmdb", "s3"])
def test_a_client_used_in_a_forked_child_is_refused_alike(tmp_path: Path, engine: str) -> None:
    if engine == "lmdb":
        backend: Any = LMDBBackend.open(tmp_path / "j")
        backend.create_invocation(make_invocation("x"))
    else:
        backend = S3Backend(_NoCalls(), "bucket", "prefix")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_use_in_child, args=(backend, queue))
    child.start()
    child.join(WAIT)
    message = queue.get(timeout=5)
    assert "before a fork; open a new one in this process" in message
    assert f"was opened in process {os.getpid()}" in message
    if engine == "lmdb":
        backend.append_entry("x", make_entry(0))  # the parent's client still works
        assert [e.index for e in backend.read_entries("x")] == [0]
    backend.close()
