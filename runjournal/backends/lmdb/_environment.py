"""One open LMDB environment per path per process.

LMDB forbids opening an environment twice in one process (closing either
copy drops the other's locks), so every client of a path shares one
:class:`Environment`: :func:`acquire` opens it or counts one more client,
:func:`release` closes it with its last client. A forked child forgets its
parent's environments and opens its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Final, TypeVar

import lmdb

from runjournal.backends.lmdb._committer import GroupCommitter
from runjournal.backends.lmdb._errors import mapped, translate_open
from runjournal.backends.lmdb._gate import ResizeGate
from runjournal.backends.lmdb._keys import MARKER, MARKER_KEY
from runjournal.journal import BackendUnavailable

__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MAX_READERS",
    "Environment",
    "acquire",
    "borrow",
    "check_layout",
    "prepare_directory",
    "release",
]

T = TypeVar("T")

DEFAULT_MAP_SIZE: Final = 256 << 20
DEFAULT_MAX_READERS: Final = 512


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

    Raises:
        BackendUnavailable: ``env`` holds something other than a journal of
            this layout (see :func:`check_layout`).
    """

    def __init__(
        self, env: lmdb.Environment, *, path: str, durable: bool, group_commit: bool
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
        check_layout(env, path)

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


def check_layout(env: lmdb.Environment, path: str) -> None:
    """Mark an empty environment as a journal; refuse any other.

    Raises:
        BackendUnavailable: ``env`` holds another application's data, or a
            journal of a layout this version cannot read.
    """
    with mapped(path), env.begin(write=True) as txn:
        marker = txn.get(MARKER_KEY)
        if marker is None:
            if txn.stat()["entries"]:
                raise BackendUnavailable(
                    f"{path} is an LMDB environment of something else, not a runjournal "
                    "journal; use a new directory for the journal"
                )
            txn.put(MARKER_KEY, MARKER)
        elif marker != MARKER:
            raise BackendUnavailable(
                f"{path} holds a runjournal journal of layout {bytes(marker)!r}, which "
                f"this version (layout {MARKER!r}) cannot read; upgrade runjournal"
            )


def prepare_directory(path: str) -> None:
    """Create ``path`` (0700) if it is missing; refuse what cannot be an environment.

    Raises:
        BackendUnavailable: ``path`` is a file, a non-empty directory without
            ``data.mdb``, or cannot be created.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise BackendUnavailable(
                f"LMDB journal path {path} is a file, not an LMDB environment directory; "
                "point the URL at a new or existing journal directory"
            )
        if not os.path.exists(os.path.join(path, "data.mdb")) and os.listdir(path):
            raise BackendUnavailable(
                f"LMDB journal path {path} is a non-empty directory with no data.mdb, so it "
                "is not an LMDB environment; use a new directory for the journal"
            )
        return
    try:
        os.makedirs(path, mode=0o700)
    except OSError as exc:
        raise BackendUnavailable(f"cannot create LMDB journal directory {path}: {exc}") from exc


def _open_environment(
    path: str, *, map_size: int, durable: bool, group_commit: bool, max_readers: int
) -> Environment:
    prepare_directory(path)
    try:
        env = lmdb.open(
            path,
            map_size=map_size,
            max_readers=max_readers,
            mode=0o600,
            sync=durable,
            metasync=durable,
            readahead=False,
        )
    except (lmdb.Error, OSError) as exc:
        raise translate_open(path, exc) from exc
    try:
        return Environment(env, path=path, durable=durable, group_commit=group_commit)
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
        env, path=env.path(), durable=bool(env.flags()["sync"]), group_commit=True
    )
    environment.refs = 1
    return environment
