"""Checking a journal's files: cheaply before LMDB maps them, fully on request.

:func:`check_before_open` runs before every first open of a path in a
process. It reads the two meta pages and the file's size (two ``pread``
calls and an ``fstat``; more only when the file is shorter than its last
page) and refuses what would make LMDB die of a signal or silently read the
wrong thing: a truncated file, a damaged meta page.

LMDB can still abort (``SIGABRT`` on a failed assertion) or fault on a page
damaged inside the file, since it trusts its pages. :func:`verify` finds out
without dying: a child process walks every page of the file without LMDB
(:mod:`._pages`), then reads every record through LMDB and checks what it
means (:class:`RecordCheck`); a child killed by a signal is one more problem
in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import lmdb

from runjournal.backends.lmdb._keys import (
    DIGEST_BYTES,
    MARKER,
    STATUS_PREFIX,
    digest,
    key_kind,
    key_text,
)
from runjournal.backends.lmdb._pages import (
    MAGIC,
    META_BYTES,
    Meta,
    PageError,
    PageFile,
    TreeWalk,
    free_pages_of,
    meta_pair_problems,
    meta_problems,
    newest,
    parse_meta,
    root_problems,
    txnid_problems,
)
from runjournal.backends.lmdb._url import path_from_url
from runjournal.journal import (
    BackendUnavailable,
    InvocationStatus,
    JournalCorrupt,
    JournalError,
    decode_entry,
    decode_invocation,
)

__all__ = [
    "DATA_FILE",
    "HALF_CREATED_WAIT",
    "HalfCreated",
    "Problem",
    "RecordCheck",
    "VerifyReport",
    "check_before_open",
    "examine",
    "verify",
]

DATA_FILE: Final = "data.mdb"
# How long an empty data.mdb is taken for one another process is creating
# (LMDB creates the file, then writes its meta pages, under its lock).
HALF_CREATED_WAIT: Final = 1.0
_OS_PAGE_SIZE: Final = 4096
_LOOKS: Final = 5  # how often a file that looks damaged is examined before it is refused
# The free tree is read at every open while it is at most this many pages (a
# few, usually): the main tree's root must not be a free page.
_FREE_TREE_READ: Final = 64
_BUSY_LOOKING: Final = 2.0  # how long looks are repeated while commits keep landing
_STATUS_OF_LETTER: Final = {prefix[1]: status for status, prefix in STATUS_PREFIX.items()}


class HalfCreated(Exception):
    """``data.mdb`` is too short to hold a meta page: being created, or truncated."""


def _corrupt(path: str, what: str) -> JournalCorrupt:
    return JournalCorrupt(f"LMDB journal {path}: data.mdb is damaged: {what}")


def _not_lmdb(path: str, why: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"{path} is not an LMDB environment runjournal can open ({why}); "
        "use a new directory for the journal"
    )


def examine(path: str) -> Meta | None:
    """Check ``path``'s ``data.mdb`` as LMDB will read it; the meta page LMDB will use.

    Returns None if there is no ``data.mdb`` (LMDB creates one).

    Raises:
        HalfCreated: the file is empty.
        JournalCorrupt: a meta page is damaged, or the file ends before a page
            in use (it was truncated).
        BackendUnavailable: the file is not LMDB's, or not of its format 1.
    """
    name = os.path.join(path, DATA_FILE)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BackendUnavailable(f"cannot read LMDB journal file {name}: {exc}") from exc
    try:
        return _examine(path, fd)
    finally:
        os.close(fd)


def _read_metas(path: str, fd: int) -> tuple[Meta, Meta]:
    first_raw = os.pread(fd, META_BYTES, 0)
    if len(first_raw) < META_BYTES:
        size = os.fstat(fd).st_size
        if size == 0:
            raise HalfCreated(path)
        raise _corrupt(path, f"it is {size} bytes, too short for LMDB's first meta page")
    first = parse_meta(first_raw, 0)
    first_problems = meta_problems(first)
    at = _OS_PAGE_SIZE if first_problems else first.page_size
    second_raw = os.pread(fd, META_BYTES, at)
    if len(second_raw) < META_BYTES:
        if first.magic != MAGIC:
            raise _not_lmdb(path, "data.mdb does not start with an LMDB meta page")
        size = os.fstat(fd).st_size
        raise _corrupt(path, f"it is {size} bytes, too short for LMDB's second meta page")
    second = parse_meta(second_raw, 1)
    if first.magic != MAGIC and second.magic != MAGIC:
        raise _not_lmdb(path, "data.mdb has no LMDB meta page")
    if first.magic == second.magic == MAGIC and first.version == second.version != 1:
        raise _not_lmdb(path, f"data.mdb is of LMDB data format {first.version}, not 1")
    second_problems = meta_problems(second)
    for meta, problems in ((first, first_problems), (second, second_problems)):
        if problems:
            raise _corrupt(path, f"meta page {meta.number}: {'; '.join(problems)}")
    pair = meta_pair_problems(first, second)
    if pair:
        raise _corrupt(path, "; ".join(pair))
    return first, second


def _examine(path: str, fd: int) -> Meta:
    metas = _read_metas(path, fd)
    current = newest(*metas)
    # The size after the meta: a commit writes its pages before its meta page.
    size = os.fstat(fd).st_size
    needed = (current.last_page + 1) * current.page_size
    pages = PageFile(fd, current.page_size, size)
    free = _free_pages(pages, current, always=size < needed)
    # A commit may leave its last pages unwritten when it freed them again
    # (LMDB's "loose" pages): a short file is sound if every page past its
    # end is listed free.
    if size < needed and not (
        free is not None
        and all(number in free for number in range(pages.pages, current.last_page + 1))
    ):
        raise _corrupt(
            path,
            f"it is {size} bytes, but LMDB's pages reach page {current.last_page} "
            f"(byte {needed}): the file was truncated",
        )
    for meta in metas:
        try:
            problems = txnid_problems(pages, meta)
        except PageError as exc:
            problems = [f"meta page {meta.number}'s free-page tree: {exc}"]
        if problems:
            raise _corrupt(path, "; ".join(problems))
    try:
        problems = root_problems(pages, current, free)
    except PageError as exc:
        problems = [f"the main tree's root: {exc}"]
    if problems:
        raise _corrupt(path, "; ".join(problems))
    return current


def _free_pages(pages: PageFile, meta: Meta, *, always: bool) -> set[int] | None:
    """The free pages, if the free tree is small (or ``always``); None if it is
    not read, or damaged (then the txnid check names the damage)."""
    tree = meta.free
    if not always and tree.branch_pages + tree.leaf_pages + tree.overflow_pages > _FREE_TREE_READ:
        return None
    try:
        return free_pages_of(TreeWalk(pages, tree, meta.last_page, "free", integer_keys=True))
    except PageError:
        return None


def check_before_open(path: str, *, wait: float | None = None) -> Meta | None:
    """:func:`examine`, waiting out a file another process is creating right now.

    An empty ``data.mdb`` is waited on for up to ``wait`` seconds (default
    :data:`HALF_CREATED_WAIT`), then refused. Without a reader slot, a look
    can meet commits of another process: pages of the older meta page's
    tree reused, a meta page half-written. So a file found damaged is looked
    at again: if a commit landed meanwhile, what was read proves nothing
    (when commits keep landing, the file is left to LMDB: a process writes
    it); damage found on a few quiet looks is damage.

    Raises:
        JournalCorrupt, BackendUnavailable: see :func:`examine`.
    """
    deadline = time.monotonic() + (HALF_CREATED_WAIT if wait is None else wait)
    busy_until = time.monotonic() + _BUSY_LOOKING
    looks = 0
    while True:
        seen = _txnids(path)
        try:
            return examine(path)
        except HalfCreated:
            if time.monotonic() >= deadline:
                raise _corrupt(
                    path,
                    "it is empty (0 bytes): it was truncated, or its creation never "
                    "finished; whatever the journal held is gone",
                ) from None
            time.sleep(0.01)
        except JournalCorrupt:
            if _txnids(path) != seen:
                if time.monotonic() >= busy_until:
                    return None
                continue
            looks += 1
            if looks >= _LOOKS:
                raise
            time.sleep(0.002 * looks)


def _txnids(path: str) -> tuple[int, ...]:
    """The txnids of the meta pages, as far as they can be read (one of them
    changes with every commit)."""
    try:
        fd = os.open(os.path.join(path, DATA_FILE), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return ()
    try:
        txnids = []
        at = 0
        for number in (0, 1):
            raw = os.pread(fd, META_BYTES, at)
            if len(raw) < META_BYTES:
                break
            meta = parse_meta(raw, number)
            txnids.append(meta.txnid)
            at = _OS_PAGE_SIZE if meta_problems(meta) else meta.page_size
        return tuple(txnids)
    finally:
        os.close(fd)


# -- verify --------------------------------------------------------------------------


@attrs.frozen
class Problem:
    """One thing :func:`verify` found wrong.

    Attributes:
        where: what it is about: ``data.mdb``, ``page 7``, ``invocation
            'order-42'``, ``key e:1a2b3c…/3``, ``LMDB``.
        what: what is wrong there.
    """

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@attrs.frozen
class VerifyReport:
    """What :func:`verify` found in one journal.

    Attributes:
        path: the journal directory.
        problems: what is wrong, in the order found; empty if nothing is.
        pages: the pages walked (both trees, overflow pages included).
        invocations: the invocation records read.
        entries: the entry records read.
    """

    path: str
    problems: tuple[Problem, ...]
    pages: int = 0
    invocations: int = 0
    entries: int = 0

    @property
    def ok(self) -> bool:
        """Nothing is wrong."""
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return (
                f"{self.path}: ok ({self.invocations} invocations, {self.entries} entries, "
                f"{self.pages} pages)"
            )
        return "\n".join(f"{self.path}: {problem}" for problem in self.problems)


class RecordCheck:
    """Checks what the journal's records mean, fed every (key, value) in key order.

    Feed :meth:`invocation` every invocation record first (LMDB sorts entry
    keys before them), then :meth:`record` every record, then call
    :meth:`finish`. Finds records of no kind this layout writes, records
    read under another id's or index's key, entries without an invocation,
    status-index keys that point nowhere or disagree with the record, and
    invocations the status index misses (``list_invocations`` and
    ``recover()`` would never see them).
    """

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.invocations: dict[bytes, tuple[str, InvocationStatus]] = {}
        self.entries = 0
        self._indexed: set[bytes] = set()
        self._orphans: dict[bytes, int] = {}
        self._marker = False

    def _add(self, where: str, what: str) -> None:
        self.problems.append(Problem(where, what))

    def invocation(self, key: bytes, value: bytes) -> None:
        """Take in an invocation record (pass one)."""
        if key_kind(key) != "invocation":
            return  # pass two names it
        try:
            inv = decode_invocation(value)
        except JournalCorrupt as exc:
            self._add(key_text(key), f"the invocation record is damaged: {exc}")
            return
        if digest(inv.id) != key[1:]:
            self._add(
                f"invocation {inv.id!r}",
                f"its record is stored under another id's key ({key_text(key)}): "
                "the key is damaged",
            )
            return
        self.invocations[key[1:]] = (inv.id, inv.status)

    def record(self, key: bytes, value: bytes) -> None:
        """Check one record (pass two: every record, in key order)."""
        kind = key_kind(key)
        if kind is None:
            self._add(key_text(key), "a key of no shape runjournal writes (a damaged key?)")
        elif kind == "marker":
            self._marker = True
            if value != MARKER:
                self._add("the layout marker", f"reads {value[:40]!r}, not {MARKER!r}")
        elif kind == "entry":
            self._entry(key, value)
        elif kind == "status":
            self._status(key, value)

    def _entry(self, key: bytes, value: bytes) -> None:
        hashed = key[1 : 1 + DIGEST_BYTES]
        index = int.from_bytes(key[1 + DIGEST_BYTES :], "big")
        owner = self.invocations.get(hashed)
        if owner is None:
            self._orphans[hashed] = self._orphans.get(hashed, 0) + 1
            return
        self.entries += 1
        where = f"invocation {owner[0]!r} entry {index}"
        try:
            entry = decode_entry(value, owner[0])
        except JournalCorrupt as exc:
            self._add(where, str(exc))
            return
        if entry.index != index:
            self._add(where, f"the record is entry {entry.index}'s: the key is damaged")

    def _status(self, key: bytes, value: bytes) -> None:
        status = _STATUS_OF_LETTER[key[1]]
        try:
            inv_id = value.decode("utf-8")
        except UnicodeDecodeError:
            self._add(key_text(key), "the status index holds bytes that are no id")
            return
        if digest(inv_id) != key[2:]:
            self._add(
                key_text(key),
                f"the status index names {inv_id!r}, whose digest is another: "
                "the key or the id is damaged",
            )
            return
        owner = self.invocations.get(key[2:])
        if owner is None:
            self._add(
                f"invocation {inv_id!r}",
                f"the status index lists it as {status.value}, but it has no record",
            )
        elif owner[1] is not status:
            self._add(
                f"invocation {inv_id!r}",
                f"the status index says {status.value}, its record says {owner[1].value}",
            )
        else:
            self._indexed.add(key[2:])

    def finish(self) -> list[Problem]:
        """Add what only the whole journal shows; return every problem."""
        if not self._marker:
            self._add("the layout marker", "is missing")
        for hashed, count in self._orphans.items():
            self._add(
                f"key e:{hashed[:6].hex()}…",
                f"{count} entr{'y' if count == 1 else 'ies'} without an invocation record",
            )
        for hashed, (inv_id, status) in self.invocations.items():
            if hashed not in self._indexed:
                self._add(
                    f"invocation {inv_id!r}",
                    f"is {status.value}, but the status index misses it "
                    "(list_invocations and recover() would not see it)",
                )
        return self.problems


def _child_code() -> str:
    return "from runjournal.backends.lmdb._check import child_main; child_main()"


def verify(path: str | os.PathLike[str], *, timeout: float | None = None) -> VerifyReport:
    """Walk every page and record of the journal at ``path`` in a child process.

    The journal may be in use: the child reads one snapshot. Nothing is
    written. Never raises for what it finds, and never dies of it: a child
    killed by a signal in LMDB is reported as a problem.

    Args:
        path: the journal directory, or its ``lmdb://`` URL.
        timeout: give up (and say so in the report) after this many seconds.

    Raises:
        ValueError: ``path`` is a URL of another scheme, or names no directory.
    """
    location = os.fspath(path)
    if "://" in location:
        location = path_from_url(location)
    real = os.path.realpath(location)
    package_root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", _child_code(), real]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = exc.stdout or b"", exc.stderr or b"", None
    text = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return _report(real, *text, code, timeout)


def _report(path: str, out: str, err: str, code: int | None, timeout: float | None) -> VerifyReport:
    problems: list[Problem] = []
    figures: dict[str, int] = {}
    for line in out.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if "where" in item:
            problems.append(Problem(item["where"], item["what"]))
        else:
            figures.update(item)
    if code is None:
        problems.append(Problem("verify", f"did not finish within {timeout} s"))
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        problems.append(
            Problem(
                "LMDB",
                f"reading every record killed the checking process with {name}: "
                "LMDB cannot read a damaged page (any process reading those records "
                "would die the same way)",
            )
        )
    elif code != 0:
        last = err.strip().splitlines()[-1:] or ["no output"]
        problems.append(Problem("verify", f"the check itself failed: {last[0]}"))
    return VerifyReport(
        path,
        tuple(problems),
        pages=figures.get("pages", 0),
        invocations=figures.get("invocations", 0),
        entries=figures.get("entries", 0),
    )


def _say(**item: object) -> None:
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()  # what is said survives a crash later on


def child_main(argv: Sequence[str] | None = None) -> None:
    """The child of :func:`verify`: one JSON line per problem, then the figures."""
    path = (sys.argv[1:] if argv is None else argv)[0]
    if not os.path.isdir(path):
        _say(where="journal", what="there is no such directory")
        return
    if not os.path.exists(os.path.join(path, DATA_FILE)):
        _say(where="journal", what="the directory holds no data.mdb")
        return
    sound = True
    try:
        check_before_open(path, wait=0)  # looks again if another process commits meanwhile
    except JournalError as exc:
        _say(where=DATA_FILE, what=str(exc))
        sound = False
    env = txn = None
    if sound:
        try:
            env = lmdb.open(path, readonly=True, max_dbs=0)
            txn = env.begin()  # pins one snapshot: its pages stay as they are
        except lmdb.Error as exc:
            _say(where="LMDB", what=f"cannot open the journal: {exc}")
    fd = os.open(os.path.join(path, DATA_FILE), os.O_RDONLY)
    try:
        meta = _meta_of(fd, None if txn is None else txn.id())
        if meta is None:
            _say(where=DATA_FILE, what="has no sound meta page to walk the pages from")
            return
        walked = _walk_pages(fd, meta)
    finally:
        os.close(fd)
    figures = {"pages": walked[0]}
    if txn is not None:
        figures.update(_check_records(txn, walked[1], walked[2]))
    _say(**figures)


def _meta_of(fd: int, txnid: int | None) -> Meta | None:
    # The snapshot's meta page, if it is still on disk (else the newest sane
    # one: a writer committed twice since, and the walk may see later pages).
    metas = []
    at = 0
    for number in (0, 1):
        raw = os.pread(fd, META_BYTES, at)
        if len(raw) < META_BYTES:
            break
        meta = parse_meta(raw, number)
        if not meta_problems(meta):
            metas.append(meta)
        at = meta.page_size if not meta_problems(meta) else _OS_PAGE_SIZE
    for meta in metas:
        if meta.txnid == txnid:
            return meta
    return max(metas, key=lambda meta: meta.txnid, default=None)


def _walk_pages(fd: int, meta: Meta) -> tuple[int, int, bytes | None]:
    """Walk both trees; return the pages walked, the records and their digest (None
    if the walk skipped damaged pages)."""
    pages = PageFile(fd, meta.page_size, os.fstat(fd).st_size)
    seen: set[int] = set()
    problems: list[PageError] = []
    free_walk = TreeWalk(pages, meta.free, meta.last_page, "free", integer_keys=True, seen=seen)
    free = free_pages_of(free_walk, problems)
    main_walk = TreeWalk(pages, meta.main, meta.last_page, "main", seen=seen)
    hashed = hashlib.sha256()
    records = 0
    for key, value in main_walk.records():
        records += 1
        hashed.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    problems += main_walk.problems
    both = sorted(seen & free)
    if both:
        problems.append(PageError(both[0], f"is in use and listed free ({len(both)} such pages)"))
    for problem in problems:
        where = DATA_FILE if problem.page is None else f"page {problem.page}"
        _say(where=where, what=problem.what)
    return len(seen), records, None if problems else hashed.digest()


def _check_records(txn: lmdb.Transaction, records: int, walked: bytes | None) -> dict[str, int]:
    check = RecordCheck()
    cursor = txn.cursor()
    if cursor.set_range(b"i"):
        for key, value in cursor:
            if key[:1] != b"i":
                break
            check.invocation(bytes(key), bytes(value))
    hashed = hashlib.sha256()
    count = 0
    for raw_key, raw_value in txn.cursor():
        key, value = bytes(raw_key), bytes(raw_value)
        count += 1
        hashed.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
        check.record(key, value)
    for problem in check.finish():
        _say(where=problem.where, what=problem.what)
    if walked is not None and (count, hashed.digest()) != (records, walked):
        _say(
            where="LMDB",
            what=f"reads {count} records, other than the {records} the page walk found",
        )
    return {"invocations": len(check.invocations), "entries": check.entries}
