"""The LMDB engine's pieces, each alone: key layout, error table, resize gate,
group committer (on a fake transaction source) and the environment cache."""

from __future__ import annotations

import functools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from itertools import permutations
from pathlib import Path
from typing import Any

import attrs
import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runjournal.backends.lmdb import LMDBBackend, Problem
from runjournal.backends.lmdb._check import (
    HalfCreated,
    RecordCheck,
    _report,
    check_before_open,
    examine,
)
from runjournal.backends.lmdb._committer import GroupCommitter, Op
from runjournal.backends.lmdb._environment import (
    TEMP_PREFIX,
    acquire,
    prepare_directory,
    publish,
    release,
)
from runjournal.backends.lmdb._errors import mapped, translate, translate_open
from runjournal.backends.lmdb._gate import ResizeGate
from runjournal.backends.lmdb._keys import (
    INDEX_BYTES,
    MARKER,
    MARKER_KEY,
    STATUS_PREFIX,
    digest,
    entries_prefix,
    entry_key,
    invocation_key,
    key_kind,
    key_text,
    status_key,
)
from runjournal.backends.lmdb._pages import (
    META_BYTES,
    P_INVALID,
    Meta,
    PageFile,
    TreeWalk,
    free_pages_of,
    meta_pair_problems,
    meta_problems,
    newest,
    overflow_page_count,
    parse_meta,
    root_problems,
    txnid_problems,
)
from runjournal.journal import (
    BackendUnavailable,
    EntryConflict,
    InvocationStatus,
    JournalCorrupt,
    JournalError,
    TransientError,
    encode_entry,
    encode_invocation,
)
from runjournal.journal.testing import make_entry, make_invocation

WAIT = 10.0  # a generous bound for every wait: a hang fails, not blocks
QUIET = 0.2  # how long "nothing happens" is watched for

IDS = ["", "a", "a\x00", "ab", "b", "order-42", "é", "\U0001f600", "x" * 10_000]
MAX_INDEX = (1 << (8 * INDEX_BYTES)) - 1


# -- key layout --------------------------------------------------------------


def test_digest_is_the_sha256_of_the_utf8_id() -> None:
    # The layout is on disk: the digest must never change (FIPS 180-2 test vector).
    assert digest("abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert all(len(digest(i)) == 32 for i in IDS)
    assert digest("é") != digest("e")


def test_every_key_fits_lmdbs_limit() -> None:
    hashed = digest("x" * 100_000)
    for key in (invocation_key(hashed), entry_key(hashed, MAX_INDEX), MARKER_KEY):
        assert len(key) <= 511
    assert all(len(status_key(s, hashed)) <= 511 for s in InvocationStatus)


@given(a=st.integers(0, MAX_INDEX), b=st.integers(0, MAX_INDEX))
def test_entry_keys_sort_in_index_order(a: int, b: int) -> None:
    hashed = digest("inv")
    assert (entry_key(hashed, a) < entry_key(hashed, b)) == (a < b)


def test_indexes_are_big_endian_and_fixed_width() -> None:
    hashed = digest("inv")
    indexes = [0, 1, 2, 255, 256, 257, 65_535, 65_536, 1 << 32, 1 << 63, MAX_INDEX]
    keys = [entry_key(hashed, i) for i in indexes]
    assert sorted(keys) == keys
    assert len({len(k) for k in keys}) == 1
    assert entry_key(hashed, 258)[-INDEX_BYTES:] == b"\x00" * 6 + b"\x01\x02"
    with pytest.raises(OverflowError):
        entry_key(hashed, MAX_INDEX + 1)


def test_entry_keys_start_with_their_invocations_prefix() -> None:
    for invocation_id in IDS:
        hashed = digest(invocation_id)
        prefix = entries_prefix(hashed)
        assert all(entry_key(hashed, i).startswith(prefix) for i in (0, 1, MAX_INDEX))
        assert not invocation_key(hashed).startswith(prefix)


def test_distinct_ids_never_share_a_prefix() -> None:
    for a, b in permutations(IDS, 2):
        da, db = digest(a), digest(b)
        assert not entries_prefix(db).startswith(entries_prefix(da))
        assert not entry_key(db, 0).startswith(entries_prefix(da))
        assert not entry_key(db, MAX_INDEX).startswith(entries_prefix(da))
        assert invocation_key(da) != invocation_key(db)
        assert all(status_key(s, da) != status_key(s, db) for s in InvocationStatus)


@given(a=st.text(), b=st.text())
def test_distinct_ids_never_share_a_prefix_any_text(a: str, b: str) -> None:
    if a != b:
        assert not entry_key(digest(b), 0).startswith(entries_prefix(digest(a)))


def test_key_kinds_never_overlap() -> None:
    # A cursor walking one kind of key must never step onto another kind.
    kinds = [MARKER_KEY, b"i", b"e", *STATUS_PREFIX.values()]
    for a, b in permutations(kinds, 2):
        assert not b.startswith(a)
    hashed = digest("inv")
    assert invocation_key(hashed).startswith(b"i")
    assert entries_prefix(hashed).startswith(b"e")
    assert MARKER == b"runjournal-lmdb/1"


def test_every_status_has_its_own_index_prefix() -> None:
    assert set(STATUS_PREFIX) == set(InvocationStatus)
    assert len(set(STATUS_PREFIX.values())) == len(InvocationStatus)
    assert {len(p) for p in STATUS_PREFIX.values()} == {2}
    hashed = digest("inv")
    for status in InvocationStatus:
        assert status_key(status, hashed) == STATUS_PREFIX[status] + hashed


# -- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lmdb_error", "journal_error"),
    [
        (lmdb.CorruptedError, JournalCorrupt),
        (lmdb.PageNotFoundError, JournalCorrupt),
        (lmdb.InvalidError, JournalCorrupt),
        (lmdb.ReadersFullError, TransientError),
        (lmdb.DiskError, TransientError),
        (lmdb.TlsFullError, TransientError),
        (lmdb.MapFullError, BackendUnavailable),
        (lmdb.BadTxnError, BackendUnavailable),
        (lmdb.ReadonlyError, BackendUnavailable),
        (lmdb.Error, BackendUnavailable),
    ],
)
def test_error_table(lmdb_error: type[lmdb.Error], journal_error: type[JournalError]) -> None:
    error = translate("/srv/j", lmdb_error("the details"))
    assert type(error) is journal_error
    assert "/srv/j" in str(error)
    assert "the details" in str(error)


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_lmdb_error_becomes_a_journal_error() -> None:
    subclasses = list(_subclasses(lmdb.Error))
    assert len(subclasses) > 20
    for cls in subclasses:
        assert isinstance(translate("/j", cls("x")), JournalError), cls


def test_mapped_translates_and_chains() -> None:
    cause = lmdb.DiskError("no space")
    with pytest.raises(TransientError, match="/j: no space") as caught, mapped("/j"):
        raise cause
    assert caught.value.__cause__ is cause


def test_mapped_lets_other_exceptions_through() -> None:
    with pytest.raises(EntryConflict), mapped("/j"):
        raise EntryConflict("inv", 3)
    with pytest.raises(KeyError), mapped("/j"):
        raise KeyError("k")
    with mapped("/j"):
        pass


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (lmdb.InvalidError("bad magic"), "not an LMDB environment runjournal can open"),
        (lmdb.VersionMismatchError("v0.8"), "not an LMDB environment runjournal can open"),
        (lmdb.ReadonlyError("read-only"), "must be writable by this process"),
        (PermissionError(13, "denied"), "cannot open LMDB journal /j: .*denied"),
    ],
)
def test_open_errors(error: lmdb.Error | OSError, match: str) -> None:
    translated = translate_open("/j", error)
    assert type(translated) is BackendUnavailable
    assert re.search(match, str(translated)), str(translated)


# -- resize gate -------------------------------------------------------------


def _start(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_many_transactions_run_at_once() -> None:
    gate = ResizeGate()
    all_inside = threading.Barrier(3, timeout=WAIT)  # broken unless all three are inside at once
    errors: list[BaseException] = []

    def transaction() -> None:
        gate.enter()
        try:
            all_inside.wait()
        except BaseException as exc:
            errors.append(exc)
        finally:
            gate.exit()

    threads = [_start(transaction) for _ in range(3)]
    for t in threads:
        t.join(WAIT)
    assert errors == []


def test_a_resize_waits_for_open_transactions() -> None:
    gate = ResizeGate()
    gate.enter()  # a transaction open in this thread
    resized = threading.Event()
    resizer = _start(lambda: gate.exclusive(resized.set))
    assert not resized.wait(QUIET)
    gate.exit()
    assert resized.wait(WAIT)
    resizer.join(WAIT)


def test_a_resize_holds_new_transactions_back() -> None:
    gate = ResizeGate()
    resizing, finish = threading.Event(), threading.Event()

    def resize() -> None:
        resizing.set()
        assert finish.wait(WAIT)

    resizer = _start(lambda: gate.exclusive(resize))
    assert resizing.wait(WAIT)
    entered = threading.Event()

    def transaction() -> None:
        gate.enter()
        entered.set()
        gate.exit()

    _start(transaction)
    assert not entered.wait(QUIET)
    finish.set()
    assert entered.wait(WAIT)
    resizer.join(WAIT)


def test_resizes_run_one_at_a_time() -> None:
    gate = ResizeGate()
    first_running, finish_first, second_ran = (threading.Event() for _ in range(3))

    def first() -> None:
        first_running.set()
        assert finish_first.wait(WAIT)

    one = _start(lambda: gate.exclusive(first))
    assert first_running.wait(WAIT)
    two = _start(lambda: gate.exclusive(second_ran.set))
    assert not second_ran.wait(QUIET)
    finish_first.set()
    assert second_ran.wait(WAIT)
    one.join(WAIT)
    two.join(WAIT)


def test_a_failed_resize_reopens_the_gate() -> None:
    gate = ResizeGate()

    def fail() -> None:
        raise OSError("set_mapsize failed")

    with pytest.raises(OSError, match="set_mapsize failed"):
        gate.exclusive(fail)
    entered = threading.Event()

    def transaction() -> None:
        gate.enter()
        entered.set()
        gate.exit()

    _start(transaction)
    assert entered.wait(WAIT)
    resized = threading.Event()
    _start(lambda: gate.exclusive(resized.set))
    assert resized.wait(WAIT)


# -- group committer, on a fake transaction source ---------------------------


class FakeTransaction:
    def __init__(self, source: FakeSource) -> None:
        self.source = source
        self.puts: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes) -> None:
        self.puts[key] = value

    def commit(self) -> None:
        self.source.commit(self)

    def abort(self) -> None:
        self.source.aborted += 1


class FakeSource:
    """Write transactions whose commits are recorded; ``hooks`` run at the
    first commits, one each, before the commit is recorded: a hook may block
    or raise (the commit then fails)."""

    def __init__(self, *hooks: Callable[[FakeTransaction], None]) -> None:
        self.hooks = list(hooks)
        self.committed: list[dict[bytes, bytes]] = []
        self.committers: list[threading.Thread] = []
        self.aborted = 0

    def begin(self, *, write: bool) -> FakeTransaction:
        assert write
        return FakeTransaction(self)

    def commit(self, txn: FakeTransaction) -> None:
        if self.hooks:
            self.hooks.pop(0)(txn)
        self.committed.append(txn.puts)
        self.committers.append(threading.current_thread())


class CountingWake:
    """Stands in for an op's ``wake`` lock: counts waits (by its writer) and wakes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.waits = 0
        self.wakes = 0

    def acquire(self) -> bool:
        self.waits += 1
        return self.lock.acquire()

    def release(self) -> None:
        self.wakes += 1
        self.lock.release()


def _never() -> None:
    raise AssertionError("not expected here")


def _committer(
    source: FakeSource,
    *,
    grouped: bool = True,
    grow: Callable[[], None] = _never,
    adopt: Callable[[], None] = _never,
) -> GroupCommitter:
    return GroupCommitter(source, ResizeGate(), path="/j", grouped=grouped, grow=grow, adopt=adopt)


def _put(key: bytes) -> Callable[[Any], bytes]:
    def fn(txn: Any) -> bytes:
        txn.put(key, b"v")
        return key

    return fn


def _op(fn: Callable[[Any], Any]) -> Op:
    op = Op(fn)
    op.wake = CountingWake()  # type: ignore[assignment]
    return op


def _together(
    fns: list[Callable[[Any], Any]], *hooks: Callable[[FakeTransaction], None]
) -> tuple[FakeSource, list[object], list[Op]]:
    """Write ``fns`` from one thread each, all queued behind one held commit.

    Returns the source, each write's outcome (its result or the exception it
    raised) and each write's op. ``hooks`` apply to the commits after the held one.
    """
    committer: list[GroupCommitter] = []
    held = threading.Event()

    def hold(txn: FakeTransaction) -> None:
        held.set()
        deadline = time.monotonic() + WAIT
        while committer[0].queued < len(fns) and time.monotonic() < deadline:
            time.sleep(0.001)  # nothing to wait on: the queue has no event

    source = FakeSource(hold, *hooks)
    committer.append(_committer(source))
    ops = [_op(fn) for fn in fns]
    outcomes: list[object] = [None] * len(fns)
    holder_outcome: list[object] = [None]

    def write(k: int) -> None:
        try:
            outcomes[k] = committer[0].write(ops[k])
        except BaseException as exc:
            outcomes[k] = exc

    def write_held() -> None:
        try:
            committer[0].write(Op(lambda txn: None))
        except BaseException as exc:
            holder_outcome[0] = exc

    holder = _start(write_held)
    assert held.wait(WAIT)
    threads = [_start(functools.partial(write, k)) for k in range(len(fns))]
    for t in [holder, *threads]:
        t.join(WAIT)
        assert not t.is_alive()
    assert holder_outcome == [None]
    assert source.committers[0] is holder
    return source, outcomes, ops


def test_a_lone_write_commits_alone() -> None:
    source = FakeSource()
    assert _committer(source).write(Op(_put(b"a"))) == b"a"
    assert source.committed == [{b"a": b"v"}]
    assert source.committers == [threading.current_thread()]


def test_waiting_writers_share_one_commit_and_are_woken_once() -> None:
    keys = [b"k%d" % k for k in range(16)]
    source, outcomes, ops = _together([_put(k) for k in keys])
    assert outcomes == keys
    assert source.committed[1:] == [dict.fromkeys(keys, b"v")]  # one commit after the held one
    # The holder handed the lead on: a writer of the batch committed it.
    assert source.committers[1] is not source.committers[0]
    # Each writer waited once, and was woken once: a writer handed the lead is
    # woken for that, then releases its own op with the rest of its batch.
    wakes = [op.wake for op in ops]
    assert [w.waits for w in wakes] == [1] * len(keys)  # type: ignore[attr-defined]
    assert [w.wakes for w in wakes] == [1 + op.lead for op in ops]  # type: ignore[attr-defined]
    assert sum(op.lead for op in ops) == 1


def test_a_refused_write_fails_alone() -> None:
    def refuse(txn: Any) -> None:
        raise EntryConflict("inv", 1)

    source, outcomes, _ = _together([_put(b"a"), refuse, _put(b"c")])
    assert outcomes[0] == b"a"
    assert isinstance(outcomes[1], EntryConflict)
    assert outcomes[2] == b"c"
    assert source.committed[1] == {b"a": b"v", b"c": b"v"}


def test_a_failed_commit_fails_every_write_of_its_batch() -> None:
    cause = lmdb.DiskError("no space")

    def fail(txn: FakeTransaction) -> None:
        raise cause

    source, outcomes, _ = _together([_put(b"a"), _put(b"b")], fail)
    assert all(isinstance(o, TransientError) and o.__cause__ is cause for o in outcomes)
    assert outcomes[0] is outcomes[1]
    assert len(source.committed) == 1  # only the held one
    assert source.aborted == 1


def test_a_non_lmdb_commit_error_reaches_every_writer_as_it_is() -> None:
    def fail(txn: FakeTransaction) -> None:
        raise OSError("gone")

    _, outcomes, _ = _together([_put(b"a"), _put(b"b")], fail)
    assert all(isinstance(o, OSError) and str(o) == "gone" for o in outcomes)


def test_an_interrupted_commit_releases_the_other_writers() -> None:
    def interrupt(txn: FakeTransaction) -> None:
        raise KeyboardInterrupt

    source, outcomes, ops = _together([_put(b"a"), _put(b"b"), _put(b"c")], interrupt)
    leader = next(k for k, op in enumerate(ops) if op.lead)
    assert isinstance(outcomes[leader], KeyboardInterrupt)
    others = [o for k, o in enumerate(outcomes) if k != leader]
    assert all(isinstance(o, TransientError) and "interrupted" in str(o) for o in others)
    assert source.aborted == 1


def test_the_committer_works_on_after_an_interrupted_commit() -> None:
    def interrupt(txn: FakeTransaction) -> None:
        raise KeyboardInterrupt

    source = FakeSource(interrupt)
    committer = _committer(source)
    with pytest.raises(KeyboardInterrupt):
        committer.write(Op(_put(b"a")))
    assert committer.write(Op(_put(b"b"))) == b"b"
    assert source.committed == [{b"b": b"v"}]


@pytest.mark.parametrize(
    ("error", "remedy"), [(lmdb.MapFullError, "grow"), (lmdb.MapResizedError, "adopt")]
)
def test_a_full_or_resized_map_is_fixed_and_the_batch_retried(
    error: type[lmdb.Error], remedy: str
) -> None:
    calls: list[str] = []

    def fail(txn: FakeTransaction) -> None:
        raise error("map")

    source = FakeSource(fail)
    committer = _committer(
        source, grow=lambda: calls.append("grow"), adopt=lambda: calls.append("adopt")
    )
    assert committer.write(Op(_put(b"a"))) == b"a"
    assert calls == [remedy]
    assert source.aborted == 1
    assert source.committed == [{b"a": b"v"}]


def test_without_group_commit_each_write_commits_alone() -> None:
    first_holding, second_done = threading.Event(), threading.Event()

    def hold(txn: FakeTransaction) -> None:
        first_holding.set()
        assert second_done.wait(WAIT)

    source = FakeSource(hold)
    committer = _committer(source, grouped=False)
    first = _start(lambda: committer.write(Op(_put(b"a"))))
    assert first_holding.wait(WAIT)
    # The second write does not queue behind the first: it commits while that one is held.
    assert committer.write(Op(_put(b"b"))) == b"b"
    assert committer.queued == 0
    second_done.set()
    first.join(WAIT)
    assert source.committed == [{b"b": b"v"}, {b"a": b"v"}]


# -- environments ------------------------------------------------------------


def test_one_environment_per_path_released_with_its_last_client(tmp_path: Path) -> None:
    first = acquire(tmp_path / "j")
    os.symlink(tmp_path / "j", tmp_path / "link")
    second = acquire(str(tmp_path / "link"))
    assert second is first
    assert first.refs == 2
    release(first)
    assert first.read(lambda txn: txn.get(MARKER_KEY)) == MARKER  # still open
    release(second)
    third = acquire(tmp_path / "j")
    assert third is not first
    assert third.refs == 1
    release(third)


# -- key shapes --------------------------------------------------------------


def test_every_key_the_layout_writes_has_a_kind_and_damaged_ones_have_none() -> None:
    hashed = digest("inv")
    assert key_kind(MARKER_KEY) == "marker"
    assert key_kind(invocation_key(hashed)) == "invocation"
    assert key_kind(entry_key(hashed, 7)) == "entry"
    assert {key_kind(status_key(s, hashed)) for s in InvocationStatus} == {"status"}
    # One flipped bit in a kind letter, or a length that is not the kind's: no kind.
    for key in (
        invocation_key(hashed),
        entry_key(hashed, 0),
        status_key(InvocationStatus.PENDING, hashed),
        MARKER_KEY,
    ):
        for bit in range(8):
            damaged = bytes([key[0] ^ (1 << bit)]) + key[1:]
            assert key_kind(damaged) is None, damaged[:2]
        assert key_kind(key + b"x") is None
    for bit in range(8):  # the status letter too
        letter = STATUS_PREFIX[InvocationStatus.PENDING][1] ^ (1 << bit)
        assert key_kind(b"s" + bytes([letter]) + hashed) is None
    assert key_kind(b"") is None


def test_key_text_names_the_kind_digest_and_index() -> None:
    hashed = digest("inv")
    assert key_text(entry_key(hashed, 3)) == f"key e:{hashed[:6].hex()}…/3"
    assert key_text(invocation_key(hashed)) == f"key i:{hashed[:6].hex()}…"
    assert key_text(status_key(InvocationStatus.FAILED, hashed)).startswith("key sf:")
    assert key_text(MARKER_KEY) == "the layout marker"
    assert key_text(b"user:1") == "key 757365723a31 (6 bytes)"


# -- LMDB's file format ------------------------------------------------------


def _metas(path: Path) -> tuple[Meta, Meta]:
    data = (path / "data.mdb").read_bytes()
    first = parse_meta(data[:META_BYTES], 0)
    return first, parse_meta(data[first.page_size : first.page_size + META_BYTES], 1)


def _journal(path: Path, invocations: int = 20, entries: int = 5) -> Path:
    """A journal of several levels of pages, with a 5000-byte value per invocation."""
    with LMDBBackend.open(path, map_size=1 << 20) as journal:
        for n in range(invocations):
            inv_id = f"real-{n:03d}"
            journal.create_invocation(make_invocation(inv_id))
            for index in range(entries):
                size = 5000 if index == 2 else 100
                journal.append_entry(inv_id, make_entry(index, os.urandom(size)))
    return path


def test_meta_pages_of_a_new_and_a_used_environment_are_sane(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "new"), map_size=1 << 20)
    env.close()
    first, second = _metas(tmp_path / "new")
    assert (first.txnid, second.txnid) == (0, 0)
    assert (first.main.root, first.last_page, first.page_size) == (P_INVALID, 1, 4096)
    assert meta_problems(first) == meta_problems(second) == []
    assert meta_pair_problems(first, second) == []
    first, second = _metas(_journal(tmp_path / "used"))
    assert abs(first.txnid - second.txnid) == 1
    assert newest(first, second).txnid == max(first.txnid, second.txnid)
    assert meta_problems(first) == meta_problems(second) == []


def test_damaged_meta_fields_are_named(tmp_path: Path) -> None:
    first, second = _metas(_journal(tmp_path / "j"))
    assert meta_problems(attrs.evolve(first, magic=0)) == ["no LMDB magic (0x00000000)"]
    assert meta_problems(attrs.evolve(first, version=2)) == ["LMDB data format 2, not 1"]
    bad_root = attrs.evolve(first, main=attrs.evolve(first.main, root=first.last_page + 1))
    assert any("root is page" in p for p in meta_problems(bad_root))
    bad_depth = attrs.evolve(first, main=attrs.evolve(first.main, depth=40))
    assert any("depth is 40" in p for p in meta_problems(bad_depth))
    bad_size = attrs.evolve(first, free=attrs.evolve(first.free, pad=3000))
    assert any("page size 3000" in p for p in meta_problems(bad_size))
    assert any("map size" in p for p in meta_problems(attrs.evolve(first, map_size=4096)))
    assert any("header says page 1" in p for p in meta_problems(attrs.evolve(first, page_number=1)))
    far = attrs.evolve(second, txnid=second.txnid + 64)
    assert "not consecutive" in meta_pair_problems(first, far)[0]


def test_overflow_page_counts_match_lmdb() -> None:
    assert overflow_page_count(1, 4096) == 1
    assert overflow_page_count(4096 - 16, 4096) == 1
    assert overflow_page_count(4096 - 15, 4096) == 2
    assert overflow_page_count(5000, 4096) == 2


def _walk(path: Path) -> tuple[TreeWalk, list[tuple[bytes, bytes]], set[int]]:
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        meta = newest(*_metas(path))
        pages = PageFile(fd, meta.page_size, os.fstat(fd).st_size)
        seen: set[int] = set()
        free = free_pages_of(TreeWalk(pages, meta.free, meta.last_page, "free", True, seen), [])
        walk = TreeWalk(pages, meta.main, meta.last_page, "main", seen=seen, locations=[])
        return walk, list(walk.records()), free
    finally:
        os.close(fd)


def test_the_page_walk_reads_what_lmdb_reads(tmp_path: Path) -> None:
    path = _journal(tmp_path / "j")
    walk, records, free = _walk(path)
    env = lmdb.open(str(path), readonly=True)
    with env.begin() as txn:
        assert records == [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    assert walk.problems == []
    assert walk.overflow_pages == 20 * 2  # one 5000-byte value each
    assert walk.branch_pages >= 1  # a tree of more than one level
    assert not free & walk.seen
    assert walk.locations is not None and len(walk.locations) == len(records)
    data = (path / "data.mdb").read_bytes()
    for (key_at, key_size, value_at, value_size), (key, value) in zip(
        walk.locations, records, strict=True
    ):
        assert data[key_at : key_at + key_size] == key
        assert data[value_at : value_at + value_size] == value


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda page: bytes(len(page)), "is all zeros"),
        (lambda page: page[:10] + b"\x07" + page[11:], "flags 0x"),  # flags: a wrong type
        (lambda page: page[:12] + b"\x08\x00" + page[14:], "bad node bounds"),  # lower
    ],
)
def test_the_page_walk_names_a_damaged_leaf(
    tmp_path: Path, damage: Callable[[bytes], bytes], problem: str
) -> None:
    path = _journal(tmp_path / "j")
    walk, _, _ = _walk(path)
    assert walk.locations is not None
    leaf = walk.locations[len(walk.locations) // 2][0] // 4096
    with open(path / "data.mdb", "r+b") as f:
        f.seek(leaf * 4096)
        page = f.read(4096)
        f.seek(leaf * 4096)
        f.write(damage(page))
    walk, records, _ = _walk(path)
    assert [e.page for e in walk.problems] == [leaf]
    assert problem in walk.problems[0].what
    assert len(records) < walk.db.entries


def test_the_page_walk_never_reads_past_the_end(tmp_path: Path) -> None:
    path = _journal(tmp_path / "j")
    size = (path / "data.mdb").stat().st_size
    os.truncate(path / "data.mdb", size // 2)
    walk, _, _ = _walk(path)
    assert any("beyond the end of data.mdb" in e.what for e in walk.problems)


# -- the check before opening ------------------------------------------------


def test_examine_finds_what_lmdb_would_die_of(tmp_path: Path) -> None:
    path = _journal(tmp_path / "j")
    data = path / "data.mdb"
    assert examine(str(path)) == newest(*_metas(path))
    assert examine(str(tmp_path / "none")) is None
    original = data.read_bytes()
    data.write_bytes(b"")
    with pytest.raises(HalfCreated):
        examine(str(path))
    for size, match in [(100, "too short for LMDB's first"), (4100, "too short for LMDB's second")]:
        data.write_bytes(original[:size])
        with pytest.raises(JournalCorrupt, match=match):
            examine(str(path))
    data.write_bytes(original[: len(original) - 4096])
    with pytest.raises(JournalCorrupt, match="the file was truncated"):
        examine(str(path))
    data.write_bytes(bytes(4096) + original[4096:])
    with pytest.raises(JournalCorrupt, match="meta page 0: no LMDB magic"):
        examine(str(path))
    data.write_bytes(os.urandom(len(original)))
    with pytest.raises(BackendUnavailable, match="not an LMDB environment runjournal can open"):
        examine(str(path))


def test_a_file_short_of_only_free_pages_is_sound(tmp_path: Path) -> None:
    # A commit may leave pages it allocated and freed again ("loose" pages)
    # unwritten at the end of the file: LMDB never reads them. A seeded run
    # of puts and deletes that ends so (found by trying seeds).
    path = tmp_path / "env"
    rnd = random.Random(21)
    env = lmdb.open(str(path), map_size=64 << 20)
    keys: list[bytes] = []
    for _ in range(40):
        with env.begin(write=True) as txn:
            for _ in range(rnd.randint(1, 50)):
                if rnd.random() < 0.6 or not keys:
                    keys.append(rnd.randbytes(rnd.randint(8, 60)))
                    txn.put(keys[-1], rnd.randbytes(rnd.choice([10, 100, 1000, 3000, 9000])))
                else:
                    txn.delete(keys.pop(rnd.randrange(len(keys))))
        meta = newest(*_metas(path))
        if (path / "data.mdb").stat().st_size < (meta.last_page + 1) * meta.page_size:
            break
    else:
        pytest.fail("no commit left its last pages unwritten")
    env.close()
    assert examine(str(path)) == meta
    env = lmdb.open(str(path), readonly=True)
    with env.begin() as txn:
        assert sorted(bytes(k) for k, _ in txn.cursor()) == sorted(keys)
    env.close()
    walk, _, _ = _walk(path)
    os.truncate(path / "data.mdb", max(walk.seen) * meta.page_size)  # a page in use is cut
    with pytest.raises(JournalCorrupt, match="truncated"):
        examine(str(path))


def test_an_empty_data_file_is_waited_on_then_refused(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "data.mdb").write_bytes(b"")
    started = time.monotonic()
    with pytest.raises(JournalCorrupt, match=r"j: data.mdb is damaged: it is empty"):
        check_before_open(str(tmp_path / "j"), wait=0.2)
    assert 0.2 <= time.monotonic() - started < 2
    # One another process fills meanwhile (LMDB creating it in place) is taken.
    _journal(tmp_path / "k")
    whole = (tmp_path / "k" / "data.mdb").read_bytes()
    timer = threading.Timer(0.1, lambda: (tmp_path / "j" / "data.mdb").write_bytes(whole))
    timer.start()
    assert check_before_open(str(tmp_path / "j"), wait=WAIT) is not None
    timer.join()


# -- creating a journal --------------------------------------------------------


def test_a_directory_may_hold_lmdbs_lock_file_and_journals_being_made(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.mkdir()
    (path / "lock.mdb").write_bytes(b"")
    (path / f"{TEMP_PREFIX}123-abc").write_bytes(b"")
    prepare_directory(str(path))
    (path / "notes.txt").write_text("hello")
    with pytest.raises(BackendUnavailable, match="non-empty directory with no data.mdb"):
        prepare_directory(str(path))
    prepare_directory(str(tmp_path / "new" / "deeper"))  # parents too, race-safe
    assert (tmp_path / "new" / "deeper").is_dir()


def test_publish_makes_a_whole_journal_once(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.mkdir()
    assert publish(str(path), map_size=1 << 20, durable=True)
    made = (path / "data.mdb").read_bytes()
    assert publish(str(path), map_size=1 << 20, durable=True)  # another one lost: no change
    assert (path / "data.mdb").read_bytes() == made
    assert os.listdir(path) == ["data.mdb"]
    env = lmdb.open(str(path))
    with env.begin() as txn:
        assert list(txn.cursor()) == [(MARKER_KEY, MARKER)]
    env.close()


def test_without_hard_links_the_journal_is_made_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "j"
    path.mkdir()
    assert not publish(str(path), map_size=1 << 20, durable=True)
    assert os.listdir(path) == []  # nothing left behind
    with LMDBBackend.open(path) as journal:  # LMDB makes it, this process marks it
        journal.create_invocation(make_invocation("x"))
    with LMDBBackend.open(path) as journal:
        assert journal.get_invocation("x") is not None


# -- what records mean -------------------------------------------------------


def _records_of(records: dict[bytes, bytes]) -> list[Problem]:
    check = RecordCheck()
    for key in sorted(records):
        if key[:1] == b"i":
            check.invocation(key, records[key])
    for key in sorted(records):
        check.record(key, records[key])
    return check.finish()


def _sound_records() -> dict[bytes, bytes]:
    records = {MARKER_KEY: MARKER}
    for n, status in enumerate(InvocationStatus):
        inv = make_invocation(f"inv-{n}", status=status)
        hashed = digest(inv.id)
        records[invocation_key(hashed)] = encode_invocation(inv)
        records[status_key(status, hashed)] = inv.id.encode()
        for index in range(3):
            records[entry_key(hashed, index)] = encode_entry(make_entry(index), inv.id)
    return records


def test_sound_records_have_no_problem() -> None:
    assert _records_of(_sound_records()) == []


def test_what_records_mean_is_checked() -> None:
    sound = _sound_records()
    h0, h1 = digest("inv-0"), digest("inv-1")
    cases: list[tuple[Callable[[dict[bytes, bytes]], object], str]] = [
        (lambda r: r.pop(MARKER_KEY), "the layout marker: is missing"),
        (lambda r: r.update({MARKER_KEY: b"runjournal-lmdb/9"}), "the layout marker: reads"),
        (lambda r: r.update({b"user:1": b"x"}), "of no shape runjournal writes"),
        (lambda r: r.pop(invocation_key(h0)), "3 entries without an invocation record"),
        (lambda r: r.pop(invocation_key(h0)), "the status index lists it as pending, but it has"),
        (
            lambda r: r.update({entry_key(h0, 1): r[entry_key(h1, 1)]}),
            "written for another invocation",
        ),
        (
            lambda r: r.update({entry_key(h0, 1): r[entry_key(h0, 2)]}),
            "the record is entry 2's: the key is damaged",
        ),
        (
            lambda r: r.update({invocation_key(h0): r[invocation_key(h1)]}),
            "its record is stored under another id's key",
        ),
        (
            lambda r: r.pop(status_key(InvocationStatus.PENDING, h0)),
            "is pending, but the status index misses it",
        ),
        (
            lambda r: r.update({status_key(InvocationStatus.PENDING, h0): b"inv-4"}),
            "whose digest is another",
        ),
        (
            lambda r: r.update(
                {
                    status_key(InvocationStatus.FAILED, h0): r.pop(
                        status_key(InvocationStatus.PENDING, h0)
                    )
                }
            ),
            "the status index says failed, its record says pending",
        ),
        (
            lambda r: r.update({invocation_key(h0): r[invocation_key(h0)][:-1] + b"\x00"}),
            "the invocation record is damaged",
        ),
    ]
    for change, expected in cases:
        records = dict(sound)
        change(records)
        problems = [str(p) for p in _records_of(records)]
        assert any(expected in p for p in problems), (expected, problems)


def test_a_report_names_a_child_killed_by_a_signal_or_stuck() -> None:
    out = '{"where": "page 7", "what": "is all zeros"}\n{"pages": 9}\n'
    report = _report("/j", out, "", -6, None)
    assert not report.ok and report.pages == 9
    assert [p.where for p in report.problems] == ["page 7", "LMDB"]
    assert "SIGABRT" in report.problems[1].what
    assert str(report).splitlines()[0] == "/j: page 7: is all zeros"
    assert "did not finish within 5 s" in str(_report("/j", "", "", None, 5))
    failed = _report("/j", "", "Traceback\nValueError: boom\n", 1, None)
    assert failed.problems[0].what == "the check itself failed: ValueError: boom"
    ok = _report("/j", '{"pages": 3, "invocations": 1, "entries": 2}\n', "", 0, None)
    assert ok.ok and str(ok) == "/j: ok (1 invocations, 2 entries, 3 pages)"


def test_a_txnid_damaged_by_two_is_caught_by_the_free_tree(tmp_path: Path) -> None:
    # Each commit lists the pages it freed under its txnid: the free tree of the
    # meta page LMDB reads must end at that txnid, or LMDB would silently read
    # the commit before the last.
    path = _journal(tmp_path / "j")
    first, second = _metas(path)
    current = newest(first, second)
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        pages = PageFile(fd, current.page_size, os.fstat(fd).st_size)
        assert txnid_problems(pages, first) == txnid_problems(pages, second) == []
        relabelled = attrs.evolve(current, txnid=current.txnid - 2)
        other = second if current is first else first
        assert meta_pair_problems(*sorted([relabelled, other], key=lambda m: m.number)) == []
        assert "the txnid is damaged" in txnid_problems(pages, relabelled)[0]
    finally:
        os.close(fd)
    offset = current.number * current.page_size + META_BYTES - 8  # the txnid's low byte
    with open(path / "data.mdb", "r+b") as f:
        f.seek(offset)
        low = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([low ^ 0x02]))
    with pytest.raises(JournalCorrupt, match="the txnid is damaged|not consecutive"):
        examine(str(path))


def test_each_meta_page_holds_txnids_of_its_parity() -> None:
    meta = parse_meta(bytes(META_BYTES), 0)
    pair = [attrs.evolve(meta, number=n, txnid=t) for n, t in enumerate((0, 0))]
    assert meta_pair_problems(*pair) == []
    for txnids, ok in [((4, 3), True), ((4, 5), True), ((3, 4), False), ((3, 3), False)]:
        pair = [attrs.evolve(meta, number=n, txnid=t) for n, t in enumerate(txnids)]
        assert (meta_pair_problems(*pair) == []) is ok, txnids


def test_a_root_number_pointing_to_a_stale_tree_is_caught(tmp_path: Path) -> None:
    # A freed root of an older tree is a consistent, stale journal: the root
    # must not be a free page, and must be of the type the depth asks for.
    path = _journal(tmp_path / "j")
    with LMDBBackend.open(path) as journal:
        journal.delete_invocation("real-000")
    current = newest(*_metas(path))
    walk, _, free = _walk(path)
    fd = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        pages = PageFile(fd, current.page_size, os.fstat(fd).st_size)
        assert root_problems(pages, current, free) == []
        stale = attrs.evolve(current, main=attrs.evolve(current.main, root=min(free)))
        assert "is a free page" in root_problems(pages, stale, free)[0]
        assert walk.db.depth > 1
        shallow = attrs.evolve(current, main=attrs.evolve(current.main, depth=1))
        assert "is not the leaf page" in root_problems(pages, shallow, None)[0]
    finally:
        os.close(fd)
