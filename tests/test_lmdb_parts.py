"""The LMDB engine's pieces, each alone: key layout, error table, resize gate,
group committer (on a fake transaction source) and the environment cache."""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from itertools import permutations
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runjournal.backends.lmdb._committer import GroupCommitter, Op
from runjournal.backends.lmdb._environment import acquire, release
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
    status_key,
)
from runjournal.journal import (
    BackendUnavailable,
    EntryConflict,
    InvocationStatus,
    JournalCorrupt,
    JournalError,
    TransientError,
)

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
