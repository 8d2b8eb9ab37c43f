"""The LMDB engine: the embedded default, durable and close to the disk's limit.

Layout (one LMDB database; a commit then dirties as few pages as possible):

- ``b"m"``: the layout marker, ``b"runjournal-lmdb/1"``
- ``b"i" + sha256(id)`` -> invocation record
- ``b"e" + sha256(id) + index (8 bytes, big-endian)`` -> entry record
- ``b"s" + status letter + sha256(id)`` -> id (UTF-8), for listing by status

Ids are hashed so any id fits LMDB's 511-byte key limit; every record keeps
its full id, and a read checks it. Writes from all threads of a process go
through one group committer: whoever finds no commit under way takes every
queued write into one transaction, so many appends share one sync while each
caller returns only after its own write is committed.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import attrs
import lmdb

from runjournal.backends._options import convert_options, flag, size, whole
from runjournal.journal import (
    BackendUnavailable,
    Capabilities,
    Entry,
    EntryConflict,
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalCorrupt,
    JournalError,
    TransientError,
    VersionConflict,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
)

__all__ = ["DEFAULT_MAP_SIZE", "LMDBBackend"]

_CAPABILITIES = Capabilities(persistent=True)

T = TypeVar("T")

DEFAULT_MAP_SIZE: Final = 256 << 20
_MARKER_KEY: Final = b"m"
_MARKER: Final = b"runjournal-lmdb/1"
_STATUS_PREFIX: Final = {
    InvocationStatus.PENDING: b"sp",
    InvocationStatus.COMPLETED: b"sc",
    InvocationStatus.FAILED: b"sf",
}
_INDEX_BYTES: Final = 8
_MAP_SIZE: Final = size(1 << 16)


def _digest(invocation_id: str) -> bytes:
    return hashlib.sha256(invocation_id.encode("utf-8")).digest()


def _invocation_key(digest: bytes) -> bytes:
    return b"i" + digest


def _entries_prefix(digest: bytes) -> bytes:
    return b"e" + digest


def _entry_key(digest: bytes, index: int) -> bytes:
    return b"e" + digest + index.to_bytes(_INDEX_BYTES, "big")


# -- errors ------------------------------------------------------------------


def _translate(path: str, exc: lmdb.Error) -> JournalError:
    """The journal error an lmdb error stands for (its cause is set by the caller)."""
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError)):
        return JournalCorrupt(f"LMDB journal {path}: the database file is damaged: {exc}")
    if isinstance(exc, (lmdb.ReadersFullError, lmdb.DiskError, lmdb.TlsFullError)):
        return TransientError(f"LMDB journal {path}: {exc}")
    return BackendUnavailable(f"LMDB journal {path}: {exc}")


@contextmanager
def _mapped(path: str) -> Iterator[None]:
    """Turn lmdb's exceptions into the journal's; callers never see lmdb's."""
    try:
        yield
    except lmdb.Error as exc:
        raise _translate(path, exc) from exc


# -- the shared environment --------------------------------------------------


class _ResizeGate:
    """Lets many transactions run at once, and a map resize run alone.

    LMDB's ``set_mapsize`` requires that no transaction of this process be open.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    def enter(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def exit(self) -> None:
        with self._cond:
            self._active -= 1
            if not self._active and self._resizing:
                self._cond.notify_all()

    def exclusive(self, fn: Callable[[], None]) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            fn()
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class _Op:
    """One queued write: ``fn`` runs inside the batch's write transaction.

    ``wake`` is held from birth; the committer releases it once the op is
    done, or once it hands the op's thread the lead (``lead``), so each
    waiting writer is woken exactly once.
    """

    __slots__ = ("error", "fn", "lead", "result", "wake")

    def __init__(self, fn: Callable[[lmdb.Transaction], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.lead = False
        self.wake = threading.Lock()
        self.wake.acquire()


class _Environment:
    """One open LMDB environment, shared by every client of its path in this process."""

    def __init__(
        self, env: lmdb.Environment, *, path: str, durable: bool, group_commit: bool
    ) -> None:
        self.env = env
        self.path = path
        self.durable = durable
        self.group_commit = group_commit
        self.pid = os.getpid()
        self.refs = 0
        self.gate = _ResizeGate()
        self._mutex = threading.Lock()
        self._queue: list[_Op] = []
        self._leading = False
        with _mapped(path), env.begin(write=True) as txn:
            marker = txn.get(_MARKER_KEY)
            if marker is None:
                if txn.stat()["entries"]:
                    raise BackendUnavailable(
                        f"{path} is an LMDB environment of something else, not a runjournal "
                        "journal; use a new directory for the journal"
                    )
                txn.put(_MARKER_KEY, _MARKER)
            elif marker != _MARKER:
                raise BackendUnavailable(
                    f"{path} holds a runjournal journal of layout {bytes(marker)!r}, which "
                    f"this version (layout {_MARKER!r}) cannot read; upgrade runjournal"
                )

    # -- reads ---------------------------------------------------------------

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            with _mapped(self.path):
                self.gate.enter()
                try:
                    with self.env.begin() as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    pass
                finally:
                    self.gate.exit()
                self._adopt_map_size()

    # -- writes ----------------------------------------------------------------

    def write(self, op: _Op) -> Any:
        """Run ``op`` in a committed (and, if durable, synced) write transaction.

        With group commit, the first writer to find no commit under way leads:
        it commits everything queued so far in one transaction, wakes each
        writer whose op it committed, and hands the lead to the first writer
        that queued meanwhile.
        """
        if not self.group_commit:
            self._commit([op])
        else:
            with self._mutex:
                self._queue.append(op)
                lead = not self._leading
                self._leading = True
            if not lead:
                op.wake.acquire()
                lead = op.lead
            if lead:
                self._lead()
        if op.error is not None:
            raise op.error
        return op.result

    def _lead(self) -> None:
        with self._mutex:
            batch, self._queue = self._queue, []
        try:
            self._commit(batch)
        finally:
            with self._mutex:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._leading = False
                else:
                    successor.lead = True
            # The next leader first: it is then first in line for the GIL, and
            # the next commit does not wait behind every writer just woken.
            if successor is not None:
                successor.wake.release()
            for op in batch:
                op.wake.release()

    def _commit(self, batch: list[_Op]) -> None:
        try:
            while True:
                try:
                    self._commit_once(batch)
                    return
                except lmdb.MapFullError:
                    self.gate.exclusive(self._grow)
                except lmdb.MapResizedError:
                    self._adopt_map_size()
        except Exception as exc:
            error = exc
            if isinstance(exc, lmdb.Error):
                error = _translate(self.path, exc)
                error.__cause__ = exc
            for op in batch:
                op.error, op.result = error, None
        except BaseException:
            # KeyboardInterrupt or the like in the committing thread: nothing
            # was committed; the other writers must not wait forever.
            for op in batch:
                op.error = TransientError(f"LMDB journal {self.path}: commit interrupted")
            raise

    def _commit_once(self, batch: list[_Op]) -> None:
        self.gate.enter()
        try:
            txn = self.env.begin(write=True)
            try:
                for op in batch:
                    try:
                        op.result, op.error = op.fn(txn), None
                    except JournalError as exc:
                        # Ops check before they write, so a refused op wrote nothing.
                        op.result, op.error = None, exc
                txn.commit()
            except BaseException:
                txn.abort()
                raise
        finally:
            self.gate.exit()

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        self.env.set_mapsize(size * 2)

    def _adopt_map_size(self) -> None:
        # Another process grew the map; 0 means "take the size on disk".
        self.gate.exclusive(lambda: self.env.set_mapsize(0))


_environments: dict[str, _Environment] = {}
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


def _prepare_directory(path: str) -> None:
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
) -> _Environment:
    _prepare_directory(path)
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
    except (lmdb.InvalidError, lmdb.VersionMismatchError) as exc:
        raise BackendUnavailable(
            f"{path} is not an LMDB environment runjournal can open ({exc}); "
            "use a new directory for the journal"
        ) from exc
    except (lmdb.Error, OSError) as exc:
        raise BackendUnavailable(
            f"cannot open LMDB journal {path}: {exc}. The directory must be writable "
            "by this process"
        ) from exc
    try:
        return _Environment(env, path=path, durable=durable, group_commit=group_commit)
    except BaseException:
        env.close()
        raise


# -- the engine --------------------------------------------------------------


class LMDBBackend:
    """A journal in an LMDB environment on local disk.

    Open it with :meth:`open` or ``open_backend("lmdb:///path")``; every
    client of one path in one process shares one LMDB environment (LMDB
    forbids opening it twice), and several processes may use the same path.

    Args (of :meth:`open`):
        path: the journal directory (created 0700; files 0600).
        map_size: the initial map size; a full map grows automatically.
        durable: sync every commit to disk (the default). ``durable=False``
            skips the sync: much faster, but a power loss or OS crash may lose
            the latest commits (a process crash loses nothing). Never the default.
        group_commit: let concurrent writers share transactions (default on).
        max_readers: LMDB's reader-slot table size (threads x processes reading).
    """

    def __init__(self, environment: lmdb.Environment | _Environment) -> None:
        """Use a ready environment (its main database holds the journal); the caller closes it."""
        if isinstance(environment, lmdb.Environment):
            flags = environment.flags()
            environment = _Environment(
                environment,
                path=environment.path(),
                durable=bool(flags["sync"]),
                group_commit=True,
            )
            environment.refs = 1
            self._owns_environment = False
        else:
            self._owns_environment = True
        self._environment = environment
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        map_size: int | str = DEFAULT_MAP_SIZE,
        durable: bool = True,
        group_commit: bool = True,
        max_readers: int = 512,
    ) -> LMDBBackend:
        """Open (creating if needed) the journal at ``path``; see the class docstring."""
        real = os.path.realpath(os.fspath(path))
        map_bytes = convert_options("lmdb", map_size=(map_size, _MAP_SIZE))["map_size"]
        with _environments_lock:
            environment = _environments.get(real)
            if environment is not None and environment.pid != os.getpid():
                environment = None
            if environment is None:
                environment = _open_environment(
                    real,
                    map_size=map_bytes,
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
        return cls(environment)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        map_size: int | str | None = None,
        durable: bool | str | None = None,
        group_commit: bool | str | None = None,
        max_readers: int | str | None = None,
    ) -> LMDBBackend:
        """Open ``lmdb:///absolute/path`` or ``lmdb://relative/path``.

        Options (keywords, or the URL's query string; None keeps the default):
        ``map_size`` (bytes or ``"512MB"``), ``durable``, ``group_commit``,
        ``max_readers``. See :meth:`open`.
        """
        parts = urlsplit(url)
        if parts.scheme != "lmdb":
            raise ValueError(f"not an lmdb:// URL: {url!r}")
        path = parts.netloc + parts.path
        if not path:
            raise ValueError(
                f"lmdb URL {url!r} names no directory; write lmdb:///abs/path or lmdb://rel/path"
            )
        options = convert_options(
            "lmdb",
            map_size=(map_size, _MAP_SIZE),
            durable=(durable, flag),
            group_commit=(group_commit, flag),
            max_readers=(max_readers, whole(1)),
        )
        return cls.open(path, **options)

    @property
    def path(self) -> str:
        """The journal directory."""
        return self._environment.path

    @property
    def capabilities(self) -> Capabilities:
        return _CAPABILITIES

    def _env(self) -> _Environment:
        if self._closed:
            raise BackendUnavailable(f"this LMDB journal client ({self.path}) is closed")
        if self._environment.pid != os.getpid():
            raise BackendUnavailable(
                f"this LMDB journal client ({self.path}) was opened in process "
                f"{self._environment.pid} before a fork; open a new one in this process"
            )
        return self._environment

    # -- records -------------------------------------------------------------

    def _decode_invocation(self, data: bytes | None, invocation_id: str) -> Invocation | None:
        if data is None:
            return None
        inv = decode_invocation(data)
        if inv.id != invocation_id:
            raise JournalCorrupt(
                f"LMDB journal {self.path}: the record stored for {invocation_id!r} "
                f"belongs to {inv.id!r}"
            )
        return inv

    def _load(self, txn: lmdb.Transaction, invocation_id: str, key: bytes) -> Invocation | None:
        data = txn.get(key)
        return self._decode_invocation(None if data is None else bytes(data), invocation_id)

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        env = self._env()
        stored = attrs.evolve(invocation, version=1)
        data = encode_invocation(stored)
        digest = _digest(invocation.id)
        key = _invocation_key(digest)

        def create(txn: lmdb.Transaction) -> tuple[Invocation, bool]:
            existing = self._load(txn, invocation.id, key)
            if existing is not None:
                return existing, False
            txn.put(key, data)
            txn.put(_STATUS_PREFIX[stored.status] + digest, invocation.id.encode("utf-8"))
            return stored, True

        return env.write(_Op(create))  # type: ignore[no-any-return]

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        env = self._env()
        key = _invocation_key(_digest(invocation_id))
        return env.read(lambda txn: self._load(txn, invocation_id, key))

    def update_invocation(self, invocation: Invocation) -> Invocation:
        env = self._env()
        stored = attrs.evolve(invocation, version=invocation.version + 1)
        data = encode_invocation(stored)
        digest = _digest(invocation.id)
        key = _invocation_key(digest)

        def update(txn: lmdb.Transaction) -> Invocation:
            current = self._load(txn, invocation.id, key)
            if current is None:
                raise InvocationNotFound(invocation.id)
            if current.version != invocation.version:
                raise VersionConflict(invocation.id, invocation.version, current.version)
            txn.put(key, data)
            if current.status is not stored.status:
                txn.delete(_STATUS_PREFIX[current.status] + digest)
                txn.put(_STATUS_PREFIX[stored.status] + digest, invocation.id.encode("utf-8"))
            return stored

        return env.write(_Op(update))  # type: ignore[no-any-return]

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        env = self._env()
        digest = _digest(invocation_id)
        prefix = _entries_prefix(digest)

        def op(txn: lmdb.Transaction) -> list[bytes]:
            cursor = txn.cursor()
            found: list[bytes] = []
            if cursor.set_range(_entry_key(digest, start)):
                for key, value in cursor:
                    if key[: len(prefix)] != prefix:
                        break
                    found.append(bytes(value))
            return found

        return [decode_entry(value) for value in env.read(op)]

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        env = self._env()
        digest = _digest(invocation_id)
        invocation_key = _invocation_key(digest)
        key = _entry_key(digest, entry.index)
        data = encode_entry(entry)

        def append(txn: lmdb.Transaction) -> None:
            # Both checks run under LMDB's writer lock, which spans processes.
            if txn.get(invocation_key) is None:
                raise InvocationNotFound(invocation_id)
            if not txn.put(key, data, overwrite=False):
                raise EntryConflict(invocation_id, entry.index)

        env.write(_Op(append))

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        env = self._env()
        prefixes = [_STATUS_PREFIX[status]] if status is not None else list(_STATUS_PREFIX.values())

        def op(txn: lmdb.Transaction) -> list[str]:
            cursor = txn.cursor()
            ids = []
            for prefix in prefixes:
                if not cursor.set_range(prefix):
                    continue
                for key, value in cursor:
                    if key[: len(prefix)] != prefix:
                        break
                    try:
                        ids.append(bytes(value).decode("utf-8"))
                    except UnicodeDecodeError as exc:
                        raise JournalCorrupt(f"LMDB journal {env.path}: bad status index") from exc
            return ids

        return iter(sorted(env.read(op)))

    def delete_invocation(self, invocation_id: str) -> bool:
        env = self._env()
        digest = _digest(invocation_id)

        def delete(txn: lmdb.Transaction) -> bool:
            current = self._load(txn, invocation_id, _invocation_key(digest))
            if current is None:
                return False
            cursor = txn.cursor()
            prefix = _entries_prefix(digest)
            if cursor.set_range(prefix):
                while bytes(cursor.key()).startswith(prefix):
                    if not cursor.delete():
                        break
            txn.delete(_STATUS_PREFIX[current.status] + digest)
            txn.delete(_invocation_key(digest))
            return True

        return env.write(_Op(delete))  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release this client; the environment closes with its last client."""
        if self._closed:
            return
        self._closed = True
        environment = self._environment
        if environment.pid != os.getpid() or not self._owns_environment:
            return
        with _environments_lock:
            environment.refs -= 1
            if environment.refs == 0:
                if _environments.get(environment.path) is environment:
                    del _environments[environment.path]
                environment.env.close()

    def __enter__(self) -> LMDBBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LMDBBackend({self.path!r}, durable={self._environment.durable})"
