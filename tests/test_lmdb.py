"""The LMDB engine, on real LMDB files on disk."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from runjournal.backends import open_backend
from runjournal.backends.lmdb import LMDBBackend, verify
from runjournal.backends.lmdb import _check as check_module
from runjournal.backends.lmdb import _environment as environment_module
from runjournal.backends.lmdb._committer import Op
from runjournal.backends.lmdb._environment import acquire, release
from runjournal.backends.lmdb._keys import (
    MARKER,
    MARKER_KEY,
    digest,
    entry_key,
    invocation_key,
    status_key,
)
from runjournal.backends.lmdb._pages import META_BYTES, PageFile, TreeWalk, newest, parse_meta
from runjournal.context import Context, Runtime
from runjournal.journal import (
    BackendUnavailable,
    EntryConflict,
    InvocationStatus,
    JournalBackend,
    JournalCorrupt,
)
from runjournal.journal.testing import JournalBackendTests, Opener, make_entry, make_invocation

ROOT = Path(__file__).resolve().parent.parent


class TestLMDBBackend(JournalBackendTests):
    @pytest.fixture
    def open_backend(self, tmp_path: Path) -> Opener:
        return lambda: LMDBBackend.open(tmp_path / "journal")

    def _overwrite(self, backend: JournalBackend, key: bytes) -> None:
        assert isinstance(backend, LMDBBackend)
        environment = acquire(backend.path)  # the backend's own: one per path per process
        try:
            with environment.env.begin(write=True) as txn:
                value = txn.get(key)
                assert value is not None
                txn.put(key, bytes(value)[:-1] + bytes([value[-1] ^ 0x55]))
        finally:
            release(environment)

    def corrupt_entry(self, backend: JournalBackend, invocation_id: str, index: int) -> None:
        self._overwrite(backend, entry_key(digest(invocation_id), index))

    def corrupt_invocation(self, backend: JournalBackend, invocation_id: str) -> None:
        self._overwrite(backend, invocation_key(digest(invocation_id)))


# -- opening -----------------------------------------------------------------


def test_same_path_twice_shares_one_environment(tmp_path: Path) -> None:
    a = LMDBBackend.open(tmp_path / "j")
    b = open_backend(f"lmdb://{tmp_path}/j")
    assert isinstance(b, LMDBBackend)
    assert a.info().clients == b.info().clients == 2
    a.close()
    # The environment stays open for the other client.
    b.create_invocation(make_invocation("x"))
    assert b.info().clients == 1
    b.close()
    # The last client closed it; a new client opens it afresh.
    c = LMDBBackend.open(tmp_path / "j")
    assert c.info().clients == 1
    assert c.get_invocation("x") is not None
    c.close()


def test_conflicting_settings_in_one_process_are_refused(tmp_path: Path) -> None:
    with LMDBBackend.open(tmp_path / "j"), pytest.raises(ValueError, match="durable=True"):
        LMDBBackend.open(tmp_path / "j", durable=False)


def test_relative_url_and_query_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = open_backend("lmdb://rel/journal?map_size=1MB&durable=false&max_readers=64")
    assert isinstance(backend, LMDBBackend)
    assert backend.path == str(tmp_path / "rel" / "journal")
    info = backend.info()
    assert info.map_size == 1 << 20
    assert info.max_readers == 64
    assert backend.durable is False
    assert (info.durable, info.group_commit) == (False, True)
    backend.close()


@pytest.mark.parametrize(
    ("query", "error", "match"),
    [
        (
            "mapsize=1",
            TypeError,
            r"lmdb:// engine .* does not take the option 'mapsize'; "
            "it takes: map_size, durable, group_commit, max_readers",
        ),
        ("map_size=lots", ValueError, "lmdb:// engine option map_size='lots': is not a size"),
        ("map_size=1KB", ValueError, "at least 64 KiB"),
        ("durable=maybe", ValueError, "option durable='maybe': must be true or false"),
        ("max_readers=0", ValueError, "option max_readers='0': must be a whole number >= 1"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, query: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        open_backend(f"lmdb://{tmp_path}/j?{query}")


def test_files_are_private(tmp_path: Path) -> None:
    with LMDBBackend.open(tmp_path / "j") as backend:
        backend.create_invocation(make_invocation())
    assert stat.S_IMODE(os.stat(tmp_path / "j").st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(tmp_path / "j" / name).st_mode) == 0o600


def test_a_file_is_not_an_environment(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("hello")
    with pytest.raises(BackendUnavailable, match="is a file, not an LMDB environment"):
        LMDBBackend.open(tmp_path / "file")


def test_a_directory_of_other_things_is_not_an_environment(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hello")
    with pytest.raises(BackendUnavailable, match="no data.mdb, so it is not an LMDB environment"):
        LMDBBackend.open(tmp_path / "docs")
    assert sorted(os.listdir(tmp_path / "docs")) == ["notes.txt"]


def test_a_damaged_data_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.mdb").write_bytes(os.urandom(16384))
    with pytest.raises(BackendUnavailable, match="not an LMDB environment runjournal can open"):
        LMDBBackend.open(tmp_path / "bad")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot write to, even as root (a read-only mount)."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o500)
        yield target
        target.chmod(0o700)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr!r}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_a_read_only_directory_gets_a_clear_error(read_only_dir: Path) -> None:
    with pytest.raises(BackendUnavailable, match="must be writable|cannot create"):
        LMDBBackend.open(read_only_dir / "journal")
    with pytest.raises(BackendUnavailable, match="must be writable|cannot open"):
        LMDBBackend.open(read_only_dir)


def test_a_ready_environment_can_be_handed_in(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "own"))
    backend = LMDBBackend(env)
    backend.create_invocation(make_invocation("x"))
    backend.close()
    assert LMDBBackend(env).get_invocation("x") is not None  # the caller's env is still open
    env.close()


def test_another_applications_lmdb_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "other"))
    with env.begin(write=True) as txn:
        txn.put(b"user:1", b"ada")
    env.close()
    with pytest.raises(BackendUnavailable, match="LMDB environment of something else"):
        LMDBBackend.open(tmp_path / "other")
    env = lmdb.open(str(tmp_path / "other"))
    with env.begin() as txn:
        assert list(txn.cursor()) == [(b"user:1", b"ada")]  # untouched
    env.close()


# -- growth ------------------------------------------------------------------


def test_a_full_map_grows_and_the_write_is_retried(tmp_path: Path) -> None:
    backend = LMDBBackend.open(tmp_path / "j", map_size=64 << 10)
    inv, _ = backend.create_invocation(make_invocation())
    payload = os.urandom(8 << 10)
    for index in range(200):  # ~1.6 MB into a 64 KiB map
        backend.append_entry(inv.id, make_entry(index, payload))
    assert [e.index for e in backend.read_entries(inv.id)] == list(range(200))
    assert backend.info().map_size >= 2 << 20
    backend.close()


def test_growth_under_concurrent_readers_and_writers(tmp_path: Path) -> None:
    backend = LMDBBackend.open(tmp_path / "j", map_size=64 << 10)
    ids = [backend.create_invocation(make_invocation(f"i{n}"))[0].id for n in range(8)]
    errors: list[BaseException] = []

    def work(inv_id: str) -> None:
        try:
            for index in range(40):
                backend.append_entry(inv_id, make_entry(index, os.urandom(4096)))
                assert len(backend.read_entries(inv_id)) == index + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(backend.read_entries(i)) == 40 for i in ids)
    backend.close()


# -- group commit ------------------------------------------------------------


def test_group_commit_shares_one_transaction_between_waiting_writers(tmp_path: Path) -> None:
    backend = LMDBBackend.open(tmp_path / "j")
    environment = acquire(backend.path)  # the backend's own: one per path per process
    committer = environment.committer
    n = 24
    ids = [backend.create_invocation(make_invocation(f"i{k}"))[0].id for k in range(n)]
    before = backend.info().last_txnid
    leading, all_queued = threading.Event(), threading.Event()

    def first_commit_waits(txn: Any) -> None:
        # Hold the first transaction until every writer has queued behind it.
        leading.set()
        deadline = time.monotonic() + 30
        while committer.queued < n and time.monotonic() < deadline:
            time.sleep(0.001)
        if committer.queued == n:
            all_queued.set()
        txn.put(MARKER_KEY, MARKER)  # a write, so this commit counts as one

    holder = threading.Thread(target=committer.write, args=(Op(first_commit_waits),))
    holder.start()
    assert leading.wait(30)
    threads = [
        threading.Thread(target=backend.append_entry, args=(ids[k], make_entry(0)))
        for k in range(n)
    ]
    for t in threads:
        t.start()
    for t in [holder, *threads]:
        t.join()
    assert all_queued.is_set()
    assert backend.info().last_txnid - before == 2  # the held commit, then 24 appends in one
    assert all(len(backend.read_entries(i)) == 1 for i in ids)
    release(environment)
    backend.close()


def test_group_commit_records_exactly_once_under_many_threads(tmp_path: Path) -> None:
    """64 threads race on 20 shared indexes of 4 invocations: one winner per index."""
    path = tmp_path / "j"
    setup = LMDBBackend.open(path)
    ids = [setup.create_invocation(make_invocation(f"inv{k}"))[0].id for k in range(4)]
    threads_n = 64
    barrier = threading.Barrier(threads_n)
    wins: list[tuple[str, int, int]] = []
    conflicts: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        client = LMDBBackend.open(path)
        barrier.wait()
        for index in range(20):
            for inv_id in ids:
                try:
                    client.append_entry(inv_id, make_entry(index, str(t).encode()))
                except EntryConflict:
                    with lock:
                        conflicts.append((inv_id, index))
                else:
                    with lock:
                        wins.append((inv_id, index, t))
        client.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 4 * 20
    assert len({(i, x) for i, x, _ in wins}) == 4 * 20
    assert len(conflicts) == 4 * 20 * (threads_n - 1)
    for inv_id in ids:
        recorded = {e.index: int(e.payload or b"") for e in setup.read_entries(inv_id)}
        assert recorded == {x: t for i, x, t in wins if i == inv_id}
    setup.close()


# -- processes ---------------------------------------------------------------


def _child_uses_inherited_and_new(path: str, queue: Any) -> None:
    inherited = _INHERITED[0]
    try:
        inherited.get_invocation("x")
        queue.put("inherited client worked")
    except BackendUnavailable as exc:
        fresh = LMDBBackend.open(path)
        ok = fresh.get_invocation("x") is not None
        fresh.append_entry("x", make_entry(1))
        fresh.close()
        queue.put(f"ok {ok} {'before a fork' in str(exc)}")


_INHERITED: list[LMDBBackend] = []


def test_a_forked_child_opens_its_own_environment(tmp_path: Path) -> None:
    parent = LMDBBackend.open(tmp_path / "j")
    parent.create_invocation(make_invocation("x"))
    parent.append_entry("x", make_entry(0))
    _INHERITED[:] = [parent]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_inherited_and_new, args=(str(tmp_path / "j"), queue))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == "ok True True"
    assert [e.index for e in parent.read_entries("x")] == [0, 1]
    parent.close()


RACER = """
import sys, time
from runjournal.backends.lmdb import LMDBBackend
from runjournal.journal import EntryConflict
from runjournal.journal.testing import make_entry
path, who, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
backend = LMDBBackend.open(path)
while time.time() < start:
    time.sleep(0.001)
won = 0
for index in range(50):
    try:
        backend.append_entry("shared", make_entry(index, who.encode()))
        won += 1
    except EntryConflict:
        pass
print(won)
"""


def test_two_processes_race_on_one_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with LMDBBackend.open(path) as backend:
        backend.create_invocation(make_invocation("shared"))
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path), who, str(start)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for who in ("a", "b", "c")
    ]
    won = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(won) == 50
    with LMDBBackend.open(path) as backend:
        entries = backend.read_entries("shared")
    assert [e.index for e in entries] == list(range(50))
    assert sorted(won) == sorted(
        sum(1 for e in entries if e.payload == who.encode()) for who in ("a", "b", "c")
    )


WORKER = """
import os, sys
from runjournal.context import Context, Runtime
path, effects, crash_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
rt = Runtime(f"lmdb://{path}")

def effect(name):
    with open(effects, "a") as f:
        f.write(name + "\\n")
    return name.upper()

@rt.handler("steps")
def steps(ctx: Context, n: int) -> list:
    out = []
    for i in range(n):
        out.append(ctx.run(lambda i=i: effect(f"step{i}"), name=f"step{i}"))
        if i + 1 == crash_after:
            os._exit(17)  # the process dies: no cleanup, no exception
    return out

print(rt.invoke("steps", 5, invocation_id="inv-1"))
"""


def test_a_killed_process_is_completed_by_another(tmp_path: Path) -> None:
    path, effects = tmp_path / "j", tmp_path / "effects.log"
    first = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), str(effects), "3"], cwd=ROOT, check=False
    )
    assert first.returncode == 17
    assert effects.read_text().split() == ["step0", "step1", "step2"]
    second = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), str(effects), "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert second.stdout.strip() == "['STEP0', 'STEP1', 'STEP2', 'STEP3', 'STEP4']"
    assert effects.read_text().split() == [f"step{i}" for i in range(5)]
    with LMDBBackend.open(path) as backend:
        stored = backend.get_invocation("inv-1")
        assert stored is not None and stored.status is InvocationStatus.COMPLETED


# -- the default -------------------------------------------------------------


def test_runtime_defaults_to_lmdb_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNJOURNAL_URL", raising=False)
    with Runtime() as rt:
        assert isinstance(rt.backend, LMDBBackend)
        assert rt.backend.path == str(tmp_path / ".runjournal")
    monkeypatch.setenv("RUNJOURNAL_URL", f"lmdb://{tmp_path}/elsewhere")
    with Runtime() as rt:
        assert isinstance(rt.backend, LMDBBackend)
        assert rt.backend.path == str(tmp_path / "elsewhere")

        @rt.handler("h")
        def h(ctx: Context, x: int) -> int:
            return ctx.run(lambda: x + 1, name="inc")  # type: ignore[no-any-return]

        assert rt.invoke("h", 1, invocation_id="a") == 2


GROWER = """
import os, sys
from runjournal.backends.lmdb import LMDBBackend
from runjournal.journal.testing import make_entry, make_invocation
backend = LMDBBackend.open(sys.argv[1], map_size=64 << 10)
backend.create_invocation(make_invocation("grown"))
for index in range(300):
    backend.append_entry("grown", make_entry(index, os.urandom(8192)))
print(backend.info().map_size)
"""


def test_a_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "j"
    backend = LMDBBackend.open(path, map_size=64 << 10)
    backend.create_invocation(make_invocation("mine"))
    backend.append_entry("mine", make_entry(0))
    grown = subprocess.run(
        [sys.executable, "-c", GROWER, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(grown.stdout) >= 2 << 20  # the other process grew the map past 2 MiB
    # This process's map is still 64 KiB: reads and writes must adopt the new size.
    assert len(backend.read_entries("grown")) == 300
    backend.append_entry("mine", make_entry(1, os.urandom(8192)))
    assert [e.index for e in backend.read_entries("mine")] == [0, 1]
    backend.close()


# -- damaged and foreign files -------------------------------------------------------


def _issue_journal(path: Path) -> None:
    """Thirty pending invocations of six entries each (the issue's examples)."""
    with LMDBBackend.open(path) as backend:
        for n in range(30):
            backend.create_invocation(make_invocation(f"inv-{n:03d}"))
            for index in range(6):
                backend.append_entry(f"inv-{n:03d}", make_entry(index, b'"%d"' % index))


def _offset_of(path: Path, key: bytes, *, in_key: int | None = None, in_value: int = 0) -> int:
    """Where byte ``in_key`` of ``key``, or byte ``in_value`` of its value, lies in data.mdb."""
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        first = parse_meta(os.pread(fd, META_BYTES, 0), 0)
        meta = newest(first, parse_meta(os.pread(fd, META_BYTES, first.page_size), 1))
        located: list[tuple[int, int, int, int]] = []
        pages = PageFile(fd, meta.page_size, os.fstat(fd).st_size)
        walk = TreeWalk(pages, meta.main, meta.last_page, "main", locations=located)
        records = [k for k, _ in walk.records()]
    finally:
        os.close(fd)
    key_at, _, value_at, _ = located[records.index(key)]
    return key_at + in_key if in_key is not None else value_at + in_value


def _flip_at(path: Path, at: int) -> None:
    with open(path / "data.mdb", "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x04]))


def test_a_flipped_bit_in_an_entry_key_is_not_a_silently_shorter_journal(tmp_path: Path) -> None:
    # The issue: read_entries returned [0, 1, 2] and resume ran steps 3-5 again.
    path = tmp_path / "j"
    _issue_journal(path)
    for byte in (5, 20, 32):  # anywhere in the digest, its last byte included
        at = _offset_of(path, entry_key(digest("inv-007"), 3), in_key=byte)
        _flip_at(path, at)
        with LMDBBackend.open(path) as backend, pytest.raises(JournalCorrupt, match=str(path)):
            backend.read_entries("inv-007")
        _flip_at(path, at)  # and back
        with LMDBBackend.open(path) as backend:
            assert [e.index for e in backend.read_entries("inv-007")] == list(range(6))


def test_a_flipped_bit_in_the_status_index_is_not_a_silently_other_id(tmp_path: Path) -> None:
    # The issue: list_invocations() named inv-424, which does not exist, not inv-024.
    path = tmp_path / "j"
    _issue_journal(path)
    _flip_at(
        path, _offset_of(path, status_key(InvocationStatus.PENDING, digest("inv-024")), in_value=4)
    )
    with LMDBBackend.open(path) as backend:
        with pytest.raises(JournalCorrupt, match=r"lists 'inv-424'.*another id's key"):
            list(backend.list_invocations(InvocationStatus.PENDING))
        with pytest.raises(JournalCorrupt):
            list(backend.list_invocations())


def test_a_flipped_bit_in_an_invocation_key_is_not_a_missing_invocation(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _issue_journal(path)
    _flip_at(path, _offset_of(path, invocation_key(digest("inv-011")), in_key=32))
    with LMDBBackend.open(path) as backend:
        with pytest.raises(JournalCorrupt, match="stored under a damaged key"):
            backend.get_invocation("inv-011")
        with pytest.raises(JournalCorrupt, match="inv-011"):
            list(backend.list_invocations())
        with pytest.raises(JournalCorrupt):  # invoke would have made it anew
            backend.create_invocation(make_invocation("inv-011"))


def test_an_index_key_without_a_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _issue_journal(path)
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.delete(invocation_key(digest("inv-003")))
    env.close()
    with (
        LMDBBackend.open(path) as backend,
        pytest.raises(JournalCorrupt, match="lists 'inv-003' as pending, but it has no record"),
    ):
        list(backend.list_invocations(InvocationStatus.PENDING))
    report = verify(path)
    assert not report.ok
    assert {str(p) for p in report.problems} >= {
        "invocation 'inv-003': the status index lists it as pending, but it has no record",
        f"key e:{digest('inv-003')[:6].hex()}…: 6 entries without an invocation record",
    }


def test_read_entries_returns_every_entry_across_gaps(tmp_path: Path) -> None:
    with LMDBBackend.open(tmp_path / "j") as backend:
        backend.create_invocation(make_invocation("gaps"))
        for index in (0, 2, 3, 7, 2**40):
            backend.append_entry("gaps", make_entry(index))
        assert [e.index for e in backend.read_entries("gaps")] == [0, 2, 3, 7, 2**40]
        assert [e.index for e in backend.read_entries("gaps", 4)] == [7, 2**40]


def test_an_empty_data_file_is_refused_not_an_empty_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check_module, "HALF_CREATED_WAIT", 0.05)
    path = tmp_path / "j"
    _issue_journal(path)
    os.truncate(path / "data.mdb", 0)
    with pytest.raises(JournalCorrupt, match=f"{path}: data.mdb is damaged: it is empty"):
        LMDBBackend.open(path)
    assert (path / "data.mdb").stat().st_size == 0  # left as it was, for whoever looks


def test_a_truncated_data_file_is_refused_before_lmdb_maps_it(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _issue_journal(path)
    os.truncate(path / "data.mdb", max(_leaf_pages(path)) * 4096)  # a leaf in use is cut
    with pytest.raises(JournalCorrupt, match="the file was truncated"):
        LMDBBackend.open(path)


def test_an_empty_environment_of_another_application_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(environment_module, "HALF_CREATED_WAIT", 0.05)
    env = lmdb.open(str(tmp_path / "never-written"))
    env.close()
    with pytest.raises(BackendUnavailable, match="empty LMDB environment that runjournal did not"):
        LMDBBackend.open(tmp_path / "never-written")
    env = lmdb.open(str(tmp_path / "emptied"))
    with env.begin(write=True) as txn:
        txn.put(b"user:1", b"ada")
    with env.begin(write=True) as txn:
        txn.delete(b"user:1")
    env.close()
    started = time.monotonic()
    monkeypatch.setattr(environment_module, "HALF_CREATED_WAIT", 10.0)
    with pytest.raises(BackendUnavailable, match="empty LMDB environment that runjournal did not"):
        LMDBBackend.open(tmp_path / "emptied")
    assert time.monotonic() - started < 5  # written to before: refused without a wait


def test_a_damaged_layout_marker_is_corruption_a_newer_one_is_not(tmp_path: Path) -> None:
    for marker, error, match in [
        (b"runjournal-lmdb/2", BackendUnavailable, "upgrade runjournal"),
        (b"runjournal/lmdb/1", JournalCorrupt, "the layout marker reads"),
        (None, JournalCorrupt, "the layout marker is missing"),
    ]:
        path = tmp_path / f"j{marker!r}"
        _issue_journal(path)
        env = lmdb.open(str(path))
        with env.begin(write=True) as txn:
            if marker is None:
                txn.delete(MARKER_KEY)
            else:
                txn.put(MARKER_KEY, marker)
        env.close()
        with pytest.raises(error, match=match):
            LMDBBackend.open(path)


# -- verify and runjournal check -------------------------------------------------------


def test_verify_walks_a_sound_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _issue_journal(path)
    with LMDBBackend.open(path) as backend:
        report = backend.verify()  # in use: the child reads one snapshot
    assert report.ok, report
    assert (report.invocations, report.entries) == (30, 180)
    assert report.pages > 10
    assert report == verify(f"lmdb://{path}")


def test_verify_reports_a_damaged_page_instead_of_dying(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _issue_journal(path)
    leaf = _leaf_pages(path)[1]
    with open(path / "data.mdb", "r+b") as f:
        f.seek(leaf * 4096)
        f.write(bytes(4096))
    report = verify(path)
    assert not report.ok
    assert f"page {leaf}: is all zeros" in [str(p) for p in report.problems]
    # LMDB itself aborts reading that page; the report says so rather than dying.
    assert any(p.where == "LMDB" and "SIGABRT" in p.what for p in report.problems)


def _leaf_pages(path: Path) -> list[int]:
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        first = parse_meta(os.pread(fd, META_BYTES, 0), 0)
        meta = newest(first, parse_meta(os.pread(fd, META_BYTES, first.page_size), 1))
        located: list[tuple[int, int, int, int]] = []
        pages = PageFile(fd, meta.page_size, os.fstat(fd).st_size)
        list(TreeWalk(pages, meta.main, meta.last_page, "main", locations=located).records())
    finally:
        os.close(fd)
    return list(dict.fromkeys(key_at // 4096 for key_at, _, _, _ in located))


def _check_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runjournal", "check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_runjournal_check_prints_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _issue_journal(path)
    done = _check_command(f"lmdb://{path}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: ok (30 invocations, 180 entries, {verify(path).pages} pages)\n"
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(entry_key(digest("nobody"), 0), b"x")
        txn.delete(status_key(InvocationStatus.PENDING, digest("inv-001")))
    env.close()
    done = _check_command(str(path))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{path}: key e:{digest('nobody')[:6].hex()}…: 1 entry without an invocation record",
        f"{path}: invocation 'inv-001': is pending, but the status index misses it "
        "(list_invocations and recover() would not see it)",
    ]
    as_json = _check_command("--json", str(path))
    assert as_json.returncode == 1 and '"ok": false' in as_json.stdout
    refused = _check_command("s3://bucket/prefix")
    assert refused.returncode == 2 and "only lmdb://" in refused.stderr
