"""One open LMDB environment per path per process.

LMDB forbids opening an environment twice in one process (closing either
copy drops the other's locks), so every client of a path shares one
:class:`Environment`: :func:`acquire` opens it or counts one more client,
:func:`release` closes it with its last client. A forked child forgets its
parent's environments and opens its own.

A new journal appears whole: its ``data.mdb`` is made, with the layout
marker, under a temporary name in the directory, then hard-linked into
place, which fails if another process got there first (:func:`publish`).
So processes opening a new path at the same moment all open the one file
that won, and a ``data.mdb`` without the marker is never a journal being
born (except on a filesystem without hard links, see :func:`publish`).
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Final, TypeVar

import lmdb

from runjournal.backends.lmdb._check import DATA_FILE, HALF_CREATED_WAIT, check_before_open
from runjournal.backends.lmdb._committer import GroupCommitter, Op
from runjournal.backends.lmdb._errors import mapped, translate_open
from runjournal.backends.lmdb._gate import ResizeGate
from runjournal.backends.lmdb._keys import MARKER, MARKER_KEY, key_kind
from runjournal.journal import BackendUnavailable, JournalCorrupt, JournalError

__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MAX_READERS",
    "Environment",
    "acquire",
    "borrow",
    "check_layout",
    "prepare_directory",
    "publish",
    "release",
]

T = TypeVar("T")

DEFAULT_MAP_SIZE: Final = 256 << 20
DEFAULT_MAX_READERS: Final = 512
LOCK_FILE: Final = "lock.mdb"
TEMP_PREFIX: Final = ".runjournal-new-"  # a data.mdb being made, before publish() links it
_OPEN_ATTEMPTS: Final = 100  # lmdb.open meeting a map another process keeps growing


class Environment:
    """One open LMDB environment, shared by every client of its path in this process.

    Attributes:
        env: the ``lmdb.Environment``; its main database holds the journal.
        path: its directory.
        durable: commits are synced to disk.
        group_commit: waiting writers share transactions.
        pid: the process that opened it (a forked child must not use it).
        refs: how many clients hold it.
        gate: entered around every transaction; map resizes run alone.
        committer: every write of this process goes through it.

    Args (besides the attributes):
        adopt_empty: mark an empty environment without the layout marker as a
            journal (one runjournal just created in place, or one handed in);
            otherwise wait a moment for another process to mark it, then refuse.

    Raises:
        BackendUnavailable: ``env`` holds something other than a journal of
            this layout (see :func:`check_layout`).
        JournalCorrupt: its layout marker is damaged or missing.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        *,
        path: str,
        durable: bool,
        group_commit: bool,
        adopt_empty: bool = False,
    ) -> None:
        self.env = env
        self.path = path
        self.durable = durable
        self.group_commit = group_commit
        self.pid = os.getpid()
        self.refs = 0
        self.gate = ResizeGate()
        self.committer = GroupCommitter(
            env,
            self.gate,
            path=path,
            grouped=group_commit,
            grow=self.grow,
            adopt=self.adopt_map_size,
        )
        self._check_layout(adopt_empty)

    def _check_layout(self, adopt_empty: bool) -> None:
        # Through the committer: a map another process grew meanwhile is adopted.
        deadline = time.monotonic() + HALF_CREATED_WAIT
        while True:
            try:
                self.committer.write(Op(lambda txn: check_layout(txn, self.path, adopt_empty)))
                return
            except _Unmarked:
                # Another process created it in place (no hard links) and is
                # about to mark it; an environment someone has written to, or
                # one still unmarked after the wait, is another program's.
                used = self.env.info()["last_txnid"] > 0
                if used or time.monotonic() >= deadline:
                    raise BackendUnavailable(
                        f"{self.path} is an empty LMDB environment that runjournal did not "
                        "create; use a new directory for the journal (or delete its "
                        "data.mdb and lock.mdb if it is yours)"
                    ) from None
            time.sleep(0.01)

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Return ``fn(txn)`` for a read transaction ``txn`` (lmdb errors translated)."""
        while True:
            with mapped(self.path):
                self.gate.enter()
                try:
                    with self.env.begin() as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    pass
                finally:
                    self.gate.exit()
                self.adopt_map_size()

    def grow(self) -> None:
        """Double the map (it was full), once no transaction of this process is open."""
        self.gate.exclusive(self._double_map_size)

    def adopt_map_size(self) -> None:
        """Take the map size another process grew the map to."""
        self.gate.exclusive(self._take_map_size_on_disk)

    def _double_map_size(self) -> None:
        self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _take_map_size_on_disk(self) -> None:
        self.env.set_mapsize(0)  # 0 means "the size on disk"


class _Unmarked(JournalError):
    """An empty environment without the layout marker (not to be adopted here)."""


_SOME_LAYOUT: Final = re.compile(rb"runjournal-lmdb/[0-9]+")


def check_layout(txn: lmdb.Transaction, path: str, adopt_empty: bool) -> None:
    """Check, in a write transaction, that the environment is a journal of this layout.

    An empty environment without the marker is marked if ``adopt_empty``.

    Raises:
        BackendUnavailable: it holds another application's data, or a
            journal of a layout this version cannot read.
        JournalCorrupt: it holds runjournal's records, but its marker is
            missing or damaged.
        _Unmarked: it is empty and unmarked, and ``adopt_empty`` is false.
    """
    marker = txn.get(MARKER_KEY)
    if marker is not None:
        marker = bytes(marker)
        if marker == MARKER:
            return
        if _SOME_LAYOUT.fullmatch(marker):
            raise BackendUnavailable(
                f"{path} holds a runjournal journal of layout {marker!r}, which "
                f"this version (layout {MARKER!r}) cannot read; upgrade runjournal"
            )
        raise JournalCorrupt(
            f"LMDB journal {path}: the layout marker reads {marker[:40]!r}, not {MARKER!r}: "
            "it is damaged"
        )
    if txn.stat()["entries"]:
        if _holds_journal_records(txn):
            raise JournalCorrupt(
                f"LMDB journal {path}: the layout marker is missing, yet it holds "
                "runjournal's records: the journal is damaged"
            )
        raise BackendUnavailable(
            f"{path} is an LMDB environment of something else, not a runjournal "
            "journal; use a new directory for the journal"
        )
    if not adopt_empty:
        raise _Unmarked(path)
    txn.put(MARKER_KEY, MARKER)


def _holds_journal_records(txn: lmdb.Transaction) -> bool:
    # The first few keys tell: another application's are of no shape this layout writes.
    cursor = txn.cursor()
    if not cursor.first():
        return False
    first_keys = itertools.islice(cursor.iternext(values=False), 8)
    return any(key_kind(bytes(key)) is not None for key in first_keys)


def prepare_directory(path: str) -> None:
    """Create ``path`` (0700) if it is missing; refuse what cannot be an environment.

    Safe when other processes create the same path at the same moment. A
    directory without ``data.mdb`` may hold LMDB's ``lock.mdb`` and files of
    a :func:`publish` under way, nothing else.

    Raises:
        BackendUnavailable: ``path`` is a file, a directory of other things,
            or cannot be created.
    """
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass  # made by the user, or a moment ago by another process
    except OSError as exc:
        raise BackendUnavailable(f"cannot create LMDB journal directory {path}: {exc}") from exc
    if not os.path.isdir(path):
        raise BackendUnavailable(
            f"LMDB journal path {path} is a file, not an LMDB environment directory; "
            "point the URL at a new or existing journal directory"
        )
    if os.path.exists(os.path.join(path, DATA_FILE)):
        return
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise BackendUnavailable(f"cannot read LMDB journal directory {path}: {exc}") from exc
    others = [n for n in names if n not in (DATA_FILE, LOCK_FILE) and not n.startswith(TEMP_PREFIX)]
    if others:
        raise BackendUnavailable(
            f"LMDB journal path {path} is a non-empty directory with no data.mdb, so it "
            "is not an LMDB environment; use a new directory for the journal"
        )


def publish(path: str, *, map_size: int, durable: bool) -> bool:
    """Make a new journal's ``data.mdb`` in ``path`` whole, unless another process does.

    The file is made with its layout marker under a temporary name, then
    hard-linked to ``data.mdb``: the link fails if that exists, so of many
    processes publishing at once, one file wins and every process opens it.

    Returns:
        True if ``data.mdb`` now exists (this process's or another's); False
        if the filesystem has no hard links: the caller lets LMDB create the
        file in place and marks it (then other processes opening it at that
        moment wait for the marker, see :class:`Environment`).

    Raises:
        BackendUnavailable: the file cannot be made (e.g. the directory is
            not writable).
    """
    temp = os.path.join(path, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    try:
        try:
            env = lmdb.open(
                temp,
                subdir=False,
                lock=False,  # no other process knows this name
                map_size=map_size,
                mode=0o600,
                sync=durable,
                metasync=durable,
                max_dbs=0,
            )
        except (lmdb.Error, OSError) as exc:
            raise translate_open(path, exc) from exc
        try:
            with mapped(path), env.begin(write=True) as txn:
                txn.put(MARKER_KEY, MARKER)
        finally:
            env.close()
        try:
            os.link(temp, os.path.join(path, DATA_FILE))
        except FileExistsError:
            return True  # another process published first: open its file
        except OSError:
            return False
        if durable:
            _sync_directory(path)
        return True
    finally:
        with suppress(OSError):  # never made (e.g. a read-only directory), or gone
            os.unlink(temp)


def _sync_directory(path: str) -> None:
    with suppress(OSError):  # not every platform syncs a directory; the link is made
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_lmdb(path: str, *, map_size: int, durable: bool, max_readers: int) -> lmdb.Environment:
    for attempt in itertools.count(1):
        try:
            return lmdb.open(
                path,
                map_size=map_size,
                max_readers=max_readers,
                mode=0o600,
                sync=durable,
                metasync=durable,
                readahead=False,
            )
        except lmdb.MapResizedError as exc:
            # Another process grew the map between LMDB reading its size and the
            # first transaction of the set-up: open again, at the new size.
            if attempt >= _OPEN_ATTEMPTS:
                raise translate_open(path, exc) from exc
        except (lmdb.Error, OSError) as exc:
            raise translate_open(path, exc) from exc
    raise AssertionError("unreachable")


def _open_environment(
    path: str, *, map_size: int, durable: bool, group_commit: bool, max_readers: int
) -> Environment:
    prepare_directory(path)
    created_in_place = False
    if not os.path.exists(os.path.join(path, DATA_FILE)):
        created_in_place = not publish(path, map_size=map_size, durable=durable)
    check_before_open(path)
    env = _open_lmdb(path, map_size=map_size, durable=durable, max_readers=max_readers)
    try:
        return Environment(
            env,
            path=path,
            durable=durable,
            group_commit=group_commit,
            adopt_empty=created_in_place,
        )
    except BaseException:
        env.close()
        raise


_environments: dict[str, Environment] = {}
_environments_lock = threading.Lock()


def _forget_inherited_environments() -> None:
    # A forked child must not use its parent's environments (LMDB forbids it).
    # Closing the child's copies touches only the child: its reader slots (it
    # has none) and its file descriptors (fcntl locks are not inherited). It
    # lets the child open the same journal afresh, e.g. gunicorn --preload.
    global _environments_lock
    for environment in _environments.values():
        with suppress(Exception):  # the copy is unusable anyway; nothing to report to
            environment.env.close()
    _environments.clear()
    _environments_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_inherited_environments)


def acquire(
    path: str | os.PathLike[str],
    *,
    map_size: int = DEFAULT_MAP_SIZE,
    durable: bool = True,
    group_commit: bool = True,
    max_readers: int = DEFAULT_MAX_READERS,
) -> Environment:
    """The environment of ``path`` in this process, opened (and created) if need be.

    One more client holds it until :func:`release`. ``map_size`` and
    ``max_readers`` count only when it is opened here.

    Raises:
        ValueError: it is open in this process with other ``durable`` or
            ``group_commit`` settings.
        BackendUnavailable: it cannot be opened (see :func:`prepare_directory`,
            :func:`check_layout`).
        JournalCorrupt: its files are damaged (see
            ``check_before_open`` in the check module).
    """
    real = os.path.realpath(os.fspath(path))
    with _environments_lock:
        environment = _environments.get(real)
        if environment is not None and environment.pid != os.getpid():
            environment = None
        if environment is None:
            environment = _open_environment(
                real,
                map_size=map_size,
                durable=durable,
                group_commit=group_commit,
                max_readers=max_readers,
            )
            _environments[real] = environment
        elif (environment.durable, environment.group_commit) != (durable, group_commit):
            raise ValueError(
                f"lmdb engine: {real} is already open in this process with "
                f"durable={environment.durable}, group_commit={environment.group_commit}; "
                "one process must use one setting per journal"
            )
        environment.refs += 1
    return environment


def release(environment: Environment) -> None:
    """One client of ``environment`` fewer; the last one closes it.

    Does nothing in a forked child: the parent's environment is not the
    child's to count (the fork hook has closed the child's copy).
    """
    if environment.pid != os.getpid():
        return
    with _environments_lock:
        environment.refs -= 1
        if environment.refs == 0:
            if _environments.get(environment.path) is environment:
                del _environments[environment.path]
            environment.env.close()


def borrow(env: lmdb.Environment) -> Environment:
    """Wrap an environment the caller opened and will close; it is not shared."""
    environment = Environment(
        env,
        path=env.path(),
        durable=bool(env.flags()["sync"]),
        group_commit=True,
        adopt_empty=True,  # the caller chose it
    )
    environment.refs = 1
    return environment
