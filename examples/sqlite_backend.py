"""A runjournal engine on SQLite, the worked example of docs/writing-a-backend.md.

Only the standard library's :mod:`sqlite3` and runjournal's :mod:`journal`
package. It passes ``runjournal.journal.testing.JournalBackendTests`` (see
``tests/test_example_sqlite.py``). Use it with::

    from runjournal.backends import open_backend, register_backend

    register_backend("sqlite", "sqlite_backend:SQLiteBackend")
    journal = open_backend("sqlite:///var/lib/shop/journal.db?timeout=10")

or publish it in a package under the ``runjournal.backends`` entry-point group.

How it keeps the protocol's promises:

- create-only writes are one ``INSERT`` against a PRIMARY KEY, so SQLite,
  not a read-then-write in Python, decides who was first;
- compare-and-swap is ``UPDATE ... WHERE id = ? AND version = ?``;
- every write is its own ``BEGIN IMMEDIATE`` transaction, committed before
  the method returns; WAL mode with ``synchronous=FULL`` makes a commit
  durable (``synchronous=NORMAL`` is faster and survives a process crash,
  not a power cut);
- threads: each call borrows a connection from a small pool (a SQLite
  connection must not be used by two threads at once), so a client is
  thread-safe; several clients and processes share the file through
  SQLite's own locking;
- records are kept in the shared runjournal format (``runjournal.journal.encode_entry``
  and friends), so damaged bytes surface as ``JournalCorrupt``;
- every ``sqlite3`` error is mapped onto a ``journal`` error in one place,
  :func:`map_sqlite_errors`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import attrs

from runjournal.journal import (
    BackendUnavailable,
    Capabilities,
    Entry,
    EntryConflict,
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalCorrupt,
    TransientError,
    VersionConflict,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
)

__all__ = ["SQLiteBackend", "map_sqlite_errors"]

#: Bumped when the tables change; a file of another version is refused.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    id      TEXT PRIMARY KEY,
    status  TEXT NOT NULL,
    version INTEGER NOT NULL,
    record  BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS invocations_by_status ON invocations (status, id);
CREATE TABLE IF NOT EXISTS entries (
    invocation_id TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    record        BLOB NOT NULL,
    PRIMARY KEY (invocation_id, idx)
) WITHOUT ROWID;
"""

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

# SQLite's default SQLITE_MAX_LENGTH is 1e9 bytes per value; keep room for
# the record's other fields.
_MAX_PAYLOAD = 1_000_000_000 - (1 << 20)


class _Conflict(Exception):
    """An INSERT hit the PRIMARY KEY: someone else wrote first."""


@contextlib.contextmanager
def map_sqlite_errors(path: str) -> Iterator[None]:
    """Turn ``sqlite3`` exceptions into :mod:`journal` ones; callers never see sqlite3's.

    "database is locked/busy" outlasting the busy timeout is transient (a
    retry may succeed); a closed connection, a missing directory or a
    permission problem makes the journal unavailable; a file that is not a
    database is corrupt.
    """
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise _Conflict(str(exc)) from exc
    except sqlite3.ProgrammingError as exc:  # used after close()
        raise BackendUnavailable(f"sqlite journal {path!r}: {exc}") from exc
    except sqlite3.OperationalError as exc:
        message = str(exc).lower()
        if "locked" in message or "busy" in message:
            raise TransientError(f"sqlite journal {path!r} is busy: {exc}") from exc
        raise BackendUnavailable(f"sqlite journal {path!r}: {exc}") from exc
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
        raise JournalCorrupt(f"sqlite journal {path!r}: {exc}") from exc


class SQLiteBackend:
    """A journal in one SQLite file, shared by threads and processes on one host.

    Args:
        path: the database file; created with its parent directories.
        timeout: how long a writer waits for another's lock, in seconds,
            before :class:`runjournal.journal.TransientError`.
        synchronous: SQLite's ``PRAGMA synchronous`` (``FULL`` by default, so
            a write is durable when the call returns).
    """

    def __init__(
        self, path: str | Path, *, timeout: float = 30.0, synchronous: str = "FULL"
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(
                f"the sqlite engine's synchronous option must be one of "
                f"{', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        self.path = str(path)
        self._timeout = timeout
        self._synchronous = synchronous.upper()
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"sqlite journal {self.path!r}: {exc}") from exc
        with self._connection() as conn, self._write(conn):
            (found,) = conn.execute("PRAGMA user_version").fetchone()
            if found not in (0, SCHEMA_VERSION):
                raise BackendUnavailable(
                    f"sqlite journal {self.path!r} has schema version {found}; this engine "
                    f"reads version {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float | str = 30.0, synchronous: str = "FULL"
    ) -> SQLiteBackend:
        """Open ``sqlite:///absolute/path.db`` or ``sqlite://relative/path.db``.

        Options come as keywords or in the query string (then as strings):
        ``timeout`` (seconds), ``synchronous`` (``FULL``, ``NORMAL``, ...).
        """
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise ValueError(f"not a sqlite:// URL: {url!r}")
        path = unquote(parts.netloc + parts.path)
        if not path or path.endswith("/"):
            raise ValueError(
                f"sqlite URL {url!r} names no file; write sqlite:///abs/path.db "
                "or sqlite://relative/path.db"
            )
        try:
            seconds = float(timeout)
        except ValueError:
            raise ValueError(
                f"the sqlite engine's timeout option must be a number of seconds, got {timeout!r}"
            ) from None
        return cls(path, timeout=seconds, synchronous=synchronous)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, max_payload_bytes=_MAX_PAYLOAD)

    # -- connections and transactions ----------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _write() opens them.
        # check_same_thread=False: the pool hands a connection to one thread
        # at a time, and close() may run on another thread.
        conn = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a connection for one call; errors come out as journal errors."""
        with self._lock:
            if self._closed:
                raise BackendUnavailable(f"this sqlite journal client ({self.path!r}) is closed")
            conn = self._idle.pop() if self._idle else None
        with map_sqlite_errors(self.path):
            if conn is None:
                conn = self._connect()
            try:
                yield conn
            finally:
                # A connection left inside a transaction (a failed ROLLBACK)
                # would hold SQLite's write lock: drop it rather than reuse it.
                with self._lock:
                    keep = not self._closed and not conn.in_transaction
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    @staticmethod
    @contextlib.contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front,
        so what it reads cannot change before it commits."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- invocations -----------------------------------------------------------

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        stored = attrs.evolve(invocation, version=1)
        with self._connection() as conn, self._write(conn):
            try:
                conn.execute(
                    "INSERT INTO invocations (id, status, version, record) VALUES (?, ?, 1, ?)",
                    (stored.id, stored.status.value, encode_invocation(stored)),
                )
            except sqlite3.IntegrityError:
                row = conn.execute(
                    "SELECT record FROM invocations WHERE id = ?", (invocation.id,)
                ).fetchone()
                return decode_invocation(row[0]), False
        return stored, True

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT record FROM invocations WHERE id = ?", (invocation_id,)
            ).fetchone()
        return None if row is None else decode_invocation(row[0])

    def update_invocation(self, invocation: Invocation) -> Invocation:
        stored = attrs.evolve(invocation, version=invocation.version + 1)
        with self._connection() as conn, self._write(conn):
            changed = conn.execute(
                "UPDATE invocations SET status = ?, version = ?, record = ? "
                "WHERE id = ? AND version = ?",
                (
                    stored.status.value,
                    stored.version,
                    encode_invocation(stored),
                    invocation.id,
                    invocation.version,
                ),
            ).rowcount
            if changed == 0:
                # Inside the same transaction, so the reason is the real one.
                row = conn.execute(
                    "SELECT version FROM invocations WHERE id = ?", (invocation.id,)
                ).fetchone()
                if row is None:
                    raise InvocationNotFound(invocation.id)
                raise VersionConflict(invocation.id, invocation.version, row[0])
        return stored

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        # Read eagerly: errors surface at the call, and no connection is held
        # while the caller iterates. TEXT compares as UTF-8 bytes, which is
        # code point order, the order Python's sorted() gives.
        with self._connection() as conn:
            if status is None:
                rows = conn.execute("SELECT id FROM invocations ORDER BY id").fetchall()
            else:
                rows = conn.execute(
                    "SELECT id FROM invocations WHERE status = ? ORDER BY id", (status.value,)
                ).fetchall()
        return iter([row[0] for row in rows])

    def delete_invocation(self, invocation_id: str) -> bool:
        with self._connection() as conn, self._write(conn):
            conn.execute("DELETE FROM entries WHERE invocation_id = ?", (invocation_id,))
            deleted = conn.execute("DELETE FROM invocations WHERE id = ?", (invocation_id,))
            return deleted.rowcount > 0

    # -- entries ------------------------------------------------------------------

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT record FROM entries WHERE invocation_id = ? AND idx >= ? ORDER BY idx",
                (invocation_id, start),
            ).fetchall()
        return [decode_entry(row[0], invocation_id) for row in rows]

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        data = encode_entry(entry, invocation_id)
        try:
            with self._connection() as conn, self._write(conn):
                exists = conn.execute(
                    "SELECT 1 FROM invocations WHERE id = ?", (invocation_id,)
                ).fetchone()
                if exists is None:
                    raise InvocationNotFound(invocation_id)
                conn.execute(
                    "INSERT INTO entries (invocation_id, idx, record) VALUES (?, ?, ?)",
                    (invocation_id, entry.index, data),
                )
        except _Conflict:
            raise EntryConflict(invocation_id, entry.index) from None

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> SQLiteBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"
