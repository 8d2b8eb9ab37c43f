"""The engine: :class:`LMDBBackend`, the journal protocol on an LMDB environment."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Final
from urllib.parse import urlsplit

import attrs
import lmdb

from runjournal.backends._options import convert_options, flag, size, whole
from runjournal.backends.lmdb._committer import Op
from runjournal.backends.lmdb._environment import (
    DEFAULT_MAP_SIZE,
    DEFAULT_MAX_READERS,
    Environment,
    acquire,
    borrow,
    release,
)
from runjournal.backends.lmdb._errors import mapped
from runjournal.backends.lmdb._keys import (
    STATUS_PREFIX,
    digest,
    entries_prefix,
    entry_key,
    invocation_key,
    status_key,
)
from runjournal.journal import (
    AppendEntry,
    BackendUnavailable,
    Capabilities,
    CreateInvocation,
    Entry,
    EntryConflict,
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalCorrupt,
    JournalError,
    VersionConflict,
    Write,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
)

__all__ = ["CAPABILITIES", "LMDBBackend", "LMDBInfo"]

CAPABILITIES: Final = Capabilities(persistent=True)
MAP_SIZE: Final = size(1 << 16)  # the map_size option's converter: at least 64 KiB


@attrs.frozen
class LMDBInfo:
    """What an LMDB journal's environment looks like now; see :meth:`LMDBBackend.info`.

    Attributes:
        path: the journal directory.
        durable: every commit is synced to disk.
        group_commit: concurrent writers share transactions.
        map_size: the map's size in bytes (it doubles whenever it is full).
        max_readers: the size of LMDB's reader-slot table.
        last_txnid: the id of the last committed write transaction, by any
            process: it grows by one per commit.
        clients: the open clients of this process that share the environment
            (1 for a client of an environment handed in).
    """

    path: str
    durable: bool
    group_commit: bool
    map_size: int
    max_readers: int
    last_txnid: int
    clients: int


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

    def __init__(self, environment: lmdb.Environment | Environment) -> None:
        """Use a ready environment (its main database holds the journal); the caller closes it."""
        if isinstance(environment, lmdb.Environment):
            environment = borrow(environment)
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
        max_readers: int = DEFAULT_MAX_READERS,
    ) -> LMDBBackend:
        """Open (creating if needed) the journal at ``path``; see the class docstring."""
        map_bytes = convert_options("lmdb", map_size=(map_size, MAP_SIZE))["map_size"]
        return cls(
            acquire(
                path,
                map_size=map_bytes,
                durable=durable,
                group_commit=group_commit,
                max_readers=max_readers,
            )
        )

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
            map_size=(map_size, MAP_SIZE),
            durable=(durable, flag),
            group_commit=(group_commit, flag),
            max_readers=(max_readers, whole(1)),
        )
        return cls.open(path, **options)

    @property
    def path(self) -> str:
        """The journal directory (its real path)."""
        return self._environment.path

    @property
    def durable(self) -> bool:
        """Whether every commit is synced to disk (see :meth:`open`)."""
        return self._environment.durable

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def info(self) -> LMDBInfo:
        """A snapshot of the environment's settings and figures, for operators.

        Raises:
            BackendUnavailable: this client is closed.
        """
        environment = self._env()
        with mapped(self.path):
            figures = environment.env.info()
            max_readers = environment.env.max_readers()
        return LMDBInfo(
            path=environment.path,
            durable=environment.durable,
            group_commit=environment.group_commit,
            map_size=figures["map_size"],
            max_readers=max_readers,
            last_txnid=figures["last_txnid"],
            clients=environment.refs,
        )

    def _env(self) -> Environment:
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
        return self._env().committer.write(self._create_op(invocation))  # type: ignore[no-any-return]

    def _create_op(self, invocation: Invocation) -> Op:
        stored = attrs.evolve(invocation, version=1)
        data = encode_invocation(stored)
        hashed = digest(invocation.id)
        key = invocation_key(hashed)

        def create(txn: lmdb.Transaction) -> tuple[Invocation, bool]:
            existing = self._load(txn, invocation.id, key)
            if existing is not None:
                return existing, False
            txn.put(key, data)
            txn.put(status_key(stored.status, hashed), invocation.id.encode("utf-8"))
            return stored, True

        return Op(create)

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        env = self._env()
        key = invocation_key(digest(invocation_id))
        return env.read(lambda txn: self._load(txn, invocation_id, key))

    def update_invocation(self, invocation: Invocation) -> Invocation:
        return self._env().committer.write(self._update_op(invocation))  # type: ignore[no-any-return]

    def _update_op(self, invocation: Invocation) -> Op:
        stored = attrs.evolve(invocation, version=invocation.version + 1)
        data = encode_invocation(stored)
        hashed = digest(invocation.id)
        key = invocation_key(hashed)

        def update(txn: lmdb.Transaction) -> Invocation:
            current = self._load(txn, invocation.id, key)
            if current is None:
                raise InvocationNotFound(invocation.id)
            if current.version != invocation.version:
                raise VersionConflict(invocation.id, invocation.version, current.version)
            txn.put(key, data)
            if current.status is not stored.status:
                txn.delete(status_key(current.status, hashed))
                txn.put(status_key(stored.status, hashed), invocation.id.encode("utf-8"))
            return stored

        return Op(update)

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        env = self._env()
        hashed = digest(invocation_id)
        prefix = entries_prefix(hashed)

        def op(txn: lmdb.Transaction) -> list[bytes]:
            cursor = txn.cursor()
            found: list[bytes] = []
            if cursor.set_range(entry_key(hashed, start)):
                for key, value in cursor:
                    if key[: len(prefix)] != prefix:
                        break
                    found.append(bytes(value))
            return found

        return [decode_entry(value, invocation_id) for value in env.read(op)]

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        self._env().committer.write(self._append_op(invocation_id, entry))

    def _append_op(self, invocation_id: str, entry: Entry) -> Op:
        hashed = digest(invocation_id)
        inv_key = invocation_key(hashed)
        key = entry_key(hashed, entry.index)
        data = encode_entry(entry, invocation_id)

        def append(txn: lmdb.Transaction) -> None:
            # Both checks run under LMDB's writer lock, which spans processes.
            if txn.get(inv_key) is None:
                raise InvocationNotFound(invocation_id)
            if not txn.put(key, data, overwrite=False):
                raise EntryConflict(invocation_id, entry.index)

        return Op(append)

    def write_batch(self, writes: Sequence[Write]) -> list[object]:
        """Do ``writes`` in one committed (and synced) transaction; see
        :class:`runjournal.journal.BatchWriter`."""
        env = self._env()
        ops = []
        for write in writes:
            if isinstance(write, AppendEntry):
                ops.append(self._append_op(write.invocation_id, write.entry))
            elif isinstance(write, CreateInvocation):
                ops.append(self._create_op(write.invocation))
            else:
                ops.append(self._update_op(write.invocation))
        env.committer.write_many(ops)
        results: list[object] = []
        for op in ops:
            if op.error is not None and not isinstance(op.error, JournalError):
                raise op.error
            results.append(op.error if op.error is not None else op.result)
        return results

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        env = self._env()
        prefixes = [STATUS_PREFIX[status]] if status is not None else list(STATUS_PREFIX.values())

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
        hashed = digest(invocation_id)

        def delete(txn: lmdb.Transaction) -> bool:
            current = self._load(txn, invocation_id, invocation_key(hashed))
            if current is None:
                return False
            cursor = txn.cursor()
            prefix = entries_prefix(hashed)
            if cursor.set_range(prefix):
                while bytes(cursor.key()).startswith(prefix):
                    if not cursor.delete():
                        break
            txn.delete(status_key(current.status, hashed))
            txn.delete(invocation_key(hashed))
            return True

        return env.committer.write(Op(delete))  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release this client; the environment closes with its last client."""
        if self._closed:
            return
        self._closed = True
        if self._owns_environment:
            release(self._environment)

    def __enter__(self) -> LMDBBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LMDBBackend({self.path!r}, durable={self.durable})"
