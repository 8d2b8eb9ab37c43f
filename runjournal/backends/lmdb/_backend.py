"""The engine: :class:`LMDBBackend`, the journal protocol on an LMDB environment."""

from __future__ import annotations

import functools
import operator
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Final, cast

import attrs
import lmdb

from runjournal.backends._options import convert_options, flag, size, whole
from runjournal.backends.lmdb._check import VerifyReport, verify
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
    DIGEST_BYTES,
    STATUS_PREFIX,
    digest,
    entries_prefix,
    entry_key,
    invocation_key,
    key_kind,
    key_text,
    status_key,
)
from runjournal.backends.lmdb._url import path_from_url
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


def _records(cursor: lmdb.Cursor) -> Iterator[tuple[bytes, bytes]]:
    """The cursor's records from where it is (copies: the environment is not
    opened with ``buffers``)."""
    return cast("Iterator[tuple[bytes, bytes]]", iter(cursor))


def _here(cursor: lmdb.Cursor) -> tuple[bytes, bytes]:
    return bytes(cursor.key()), bytes(cursor.value())


def _seek(
    txn: lmdb.Transaction, target: bytes
) -> tuple[lmdb.Cursor, bool, list[tuple[bytes, bytes]]]:
    """A cursor at the first key >= ``target`` (and whether there is one), and the
    two records before it (fewer at the start), nearest last.

    One search, from the root of a new cursor: a positioned cursor searches
    from where it is and, with a damaged key breaking the order, may land
    elsewhere. The records before are stepped to, and back.
    """
    cursor = txn.cursor()
    before: list[tuple[bytes, bytes]] = []
    if not cursor.set_range(target):
        moved = cursor.last()
        while moved and len(before) < 2:
            before.append(_here(cursor))
            moved = cursor.prev()
        return cursor, False, before[::-1]
    while len(before) < 2 and cursor.prev():
        before.append(_here(cursor))
    if len(before) == 2:
        cursor.next()
        cursor.next()
    else:  # a step back fell off the start: count from the first record
        cursor.first()
        for _ in before:
            cursor.next()
    return cursor, True, before[::-1]


def _after(cursor: lmdb.Cursor, key: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """The cursor's record (``key``, ``value``) and the one after it, if any."""
    found = [(key, value)]
    if cursor.next():
        found.append(_here(cursor))
    return found


def _in_order(keys: Sequence[Any]) -> bool:
    return all(map(operator.lt, keys, keys[1:]))


_CHUNK: Final = 1024


@functools.lru_cache(maxsize=64)
def _indexes(count: int) -> struct.Struct:
    """Reads the indexes of ``count`` joined entry keys (each after its prefix)."""
    return struct.Struct(">" + f"{1 + DIGEST_BYTES}xQ" * count)


_INDEX_OF: Final = operator.attrgetter("index")


def _key_indexes(keys: Sequence[bytes], width: int) -> list[int] | None:
    """The index in each of ``keys`` (entry keys of ``width`` bytes), read in C;
    None if they do not add up to that width (one of other length would shift
    the rest, whose indexes then disagree with their records)."""
    joined = b"".join(keys)
    if len(joined) != width * len(keys):
        return None
    indexes: list[int] = []
    for at in range(0, len(keys), _CHUNK):
        count = min(_CHUNK, len(keys) - at)
        indexes += _indexes(count).unpack_from(joined, at * width)
    return indexes


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
        path = path_from_url(url)
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

    def verify(self, *, timeout: float | None = None) -> VerifyReport:
        """Walk every page and record of this journal in a child process; see
        :func:`runjournal.backends.lmdb.verify` (which needs no open client)."""
        return verify(self.path, timeout=timeout)

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

    def _corrupt(self, what: str) -> JournalCorrupt:
        return JournalCorrupt(f"LMDB journal {self.path}: {what}")

    def _decode_invocation(self, data: bytes | None, invocation_id: str) -> Invocation | None:
        if data is None:
            return None
        try:
            inv = decode_invocation(data)
        except JournalCorrupt as exc:
            raise self._corrupt(f"invocation {invocation_id!r}: {exc}") from exc
        if inv.id != invocation_id:
            raise self._corrupt(f"the record stored for {invocation_id!r} belongs to {inv.id!r}")
        return inv

    def _load(self, txn: lmdb.Transaction, invocation_id: str, key: bytes) -> Invocation | None:
        data = txn.get(key)
        if data is None:
            self._check_absent(txn, invocation_id, key)
            return None
        return self._decode_invocation(bytes(data), invocation_id)

    def _check_absent(self, txn: lmdb.Transaction, invocation_id: str, key: bytes) -> None:
        """Raise if the record is missing because a key was damaged.

        A damaged key keeps its place among the keys, so it shows next to
        where the record belongs: of no shape this layout writes, an
        invocation key whose record holds this id, or out of order (then the
        search may have missed the record).
        """
        cursor, landed, near = _seek(txn, key)
        if landed:
            near += _after(cursor, *_here(cursor))
        if not _in_order([k for k, _ in near]):
            raise self._corrupt(f"keys near where {invocation_id!r} belongs are out of order")
        wanted = invocation_id.encode("utf-8", "surrogatepass")
        for other, value in near:
            kind = key_kind(other)
            if kind is None:
                raise self._corrupt(
                    f"{key_text(other)}, next to where {invocation_id!r} belongs, is of no "
                    "shape runjournal writes: a key is damaged"
                )
            if kind == "invocation" and wanted in value:
                try:
                    owner = decode_invocation(value).id
                except JournalCorrupt:
                    continue  # that record's own damage, found when it is read
                if owner == invocation_id:
                    raise self._corrupt(
                        f"the record of {invocation_id!r} is stored under a damaged key "
                        f"({key_text(other)})"
                    )

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
        first = entry_key(hashed, start)
        size = len(prefix)

        def op(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            cursor, landed, before = _seek(txn, first)
            after: list[tuple[bytes, bytes]] = []
            found: list[tuple[bytes, bytes]] = []
            if landed:
                for record in _records(cursor):
                    if record[0][:size] != prefix:
                        after = _after(cursor, *record)
                        break
                    found.append(record)
            ends = [key for key, _ in found[:1] + found[1:][-1:]]
            self._check_around(txn, invocation_id, hashed, start, before, ends, after)
            return found

        found = env.read(op)
        if not found:
            return []
        keys, values = zip(*found, strict=True)
        try:
            entries = [decode_entry(value, invocation_id) for value in values]
        except JournalCorrupt:
            entries = []
            for key, value in found:  # which one, for the message
                try:
                    entries.append(decode_entry(value, invocation_id))
                except JournalCorrupt as exc:
                    raise self._corrupt(
                        f"invocation {invocation_id!r} {key_text(key)}: {exc}"
                    ) from exc
        # Each record holds its index: it must be the one its key says, so a key
        # damaged into another index of the same invocation is caught. In bulk:
        # replay reads thousands of entries at once.
        indexes = _key_indexes(keys, len(first))
        if indexes is None:
            raise self._corrupt(f"invocation {invocation_id!r}: an entry key has another length")
        if list(map(_INDEX_OF, entries)) != indexes:
            key, entry = next(
                (key, entry)
                for key, entry, index in zip(keys, entries, indexes, strict=True)
                if entry.index != index
            )
            raise self._corrupt(
                f"invocation {invocation_id!r}: the record under {key_text(key)} is "
                f"entry {entry.index}'s: the key is damaged"
            )
        if not _in_order(indexes):
            raise self._corrupt(f"invocation {invocation_id!r}: its entry keys are out of order")
        return entries

    def _check_around(
        self,
        txn: lmdb.Transaction,
        invocation_id: str,
        hashed: bytes,
        start: int,
        before: list[tuple[bytes, bytes]],
        ends: list[bytes],
        after: list[tuple[bytes, bytes]],
    ) -> None:
        """Raise if the keys around the entries read betray a damaged key.

        A damaged key keeps its place among the keys. The two keys before
        the entries read and the two after must be in order with them (else
        the search may have been misled past some of them) and of a shape
        this layout writes; the nearest on each side must not be bound to
        this id (else an entry of it is stored under a damaged key).
        """
        first = entry_key(hashed, start)
        keys = [key for key, _ in before] + ends + [key for key, _ in after]
        landed = ends[:1] or [key for key, _ in after[:1]]
        if (
            not _in_order(keys)
            or any(key >= first for key, _ in before)
            or (landed and landed[0] < first)
        ):
            raise self._corrupt(
                f"invocation {invocation_id!r}: the keys around its entries are out of order"
            )
        # A damaged key of ours would be the nearest on either side (or, with the
        # search misled, the nearest before, out of order with the one before it).
        for key, value in before[-1:] + after[:1]:
            self._check_neighbour(txn, invocation_id, hashed, key, value, start)
        for key, _ in before[:-1] + after[1:]:
            if key_kind(key) is None:
                raise self._corrupt(
                    f"{key_text(key)}, near the entries of {invocation_id!r}, is of no shape "
                    "runjournal writes: a key is damaged"
                )

    def _check_neighbour(
        self,
        txn: lmdb.Transaction,
        invocation_id: str,
        hashed: bytes,
        key: bytes,
        value: bytes,
        start: int,
    ) -> None:
        """Raise if ``key``, the key just outside the entries read, betrays a damaged key.

        A damaged key keeps its place among the keys, so an entry whose key
        was damaged sits next to its invocation's entries: of no shape this
        layout writes, under another id's digest but bound to this id, or
        (when the damaged order misled the search) one of ours that was skipped.
        """
        kind = key_kind(key)
        if kind is None:
            raise self._corrupt(
                f"{key_text(key)}, next to the entries of {invocation_id!r}, is of no shape "
                "runjournal writes: a key is damaged"
            )
        if kind != "entry":
            return
        if key[1 : 1 + DIGEST_BYTES] == hashed:
            if int.from_bytes(key[1 + DIGEST_BYTES :], "big") >= start:
                raise self._corrupt(
                    f"invocation {invocation_id!r}: {key_text(key)} is out of place"
                )
            return
        try:
            decode_entry(bytes(value), invocation_id)
        except JournalCorrupt:
            return  # bound to another invocation (or damaged: found when that one is read)
        # Bound to this id: ours under a damaged key, unless that invocation's id
        # shares this id's checksum (one chance in 2**32).
        owner = txn.get(invocation_key(key[1 : 1 + DIGEST_BYTES]))
        if owner is not None:
            try:
                decode_entry(bytes(value), decode_invocation(bytes(owner)).id)
                return
            except JournalCorrupt:
                pass
        raise self._corrupt(
            f"invocation {invocation_id!r}: an entry of it is stored under a damaged key "
            f"({key_text(key)})"
        )

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
        """Yield the ids of invocations with ``status`` (all if None), sorted.

        Each id's record is read and must agree with the status index.

        Raises:
            JournalCorrupt: an index key points to no record, or to one of
                another id or status; or a key next to the index is damaged.
        """
        env = self._env()
        wanted = [status] if status is not None else list(STATUS_PREFIX)

        def op(txn: lmdb.Transaction) -> list[str]:
            ids = []
            for listed in wanted:
                prefix = STATUS_PREFIX[listed]
                cursor, landed, before = _seek(txn, prefix)
                after: list[tuple[bytes, bytes]] = []
                keys: list[bytes] = []
                if landed:
                    for key, value in _records(cursor):
                        if key[: len(prefix)] != prefix:
                            after = _after(cursor, key, value)
                            break
                        if keys and key <= keys[-1]:
                            raise self._corrupt(
                                f"the status index is out of order at {key_text(key)}"
                            )
                        keys.append(key)
                        ids.append(self._indexed(txn, listed, key, value))
                around = [key for key, _ in before] + keys[:1] + keys[-1:] + [k for k, _ in after]
                first = (keys or [k for k, _ in after])[:1]
                if (
                    not _in_order(list(dict.fromkeys(around)))
                    or any(key >= prefix for key, _ in before)
                    or (first and first[0] < prefix)
                ):
                    raise self._corrupt("the keys around the status index are out of order")
                for key, _ in before + after:
                    self._check_index_neighbour(key)
            return ids

        return iter(sorted(env.read(op)))

    def _check_index_neighbour(self, key: bytes) -> None:
        # A damaged index key keeps its place: it is a neighbour of the index.
        if key_kind(key) is None:
            raise self._corrupt(
                f"{key_text(key)}, next to the status index, is of no shape runjournal "
                "writes: a key is damaged"
            )

    def _indexed(
        self, txn: lmdb.Transaction, status: InvocationStatus, key: bytes, value: bytes
    ) -> str:
        """The id a status-index key holds, checked against the key and the record."""
        try:
            inv_id = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._corrupt(f"the status index holds {value[:40]!r}, not an id") from exc
        hashed = key[len(STATUS_PREFIX[status]) :]
        if len(hashed) != DIGEST_BYTES or digest(inv_id) != hashed:
            raise self._corrupt(
                f"the status index lists {inv_id!r} under {key_text(key)}, another id's key: "
                "the key or the id is damaged"
            )
        data = txn.get(invocation_key(hashed))
        if data is None:
            self._check_absent(txn, inv_id, invocation_key(hashed))
            raise self._corrupt(
                f"the status index lists {inv_id!r} as {status.value}, but it has no record"
            )
        stored = self._decode_invocation(bytes(data), inv_id)
        assert stored is not None
        if stored.status is not status:
            raise self._corrupt(
                f"the status index lists {inv_id!r} as {status.value}, its record says "
                f"{stored.status.value}"
            )
        return inv_id

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
