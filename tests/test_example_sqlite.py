"""The worked example engine (examples/sqlite_backend.py) against the conformance kit.

It is the proof that the protocol, the record format and the kit are enough
for an engine written outside this repository.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from runjournal.backends import _registry, open_backend, register_backend
from runjournal.context import Context, Runtime
from runjournal.context.testing import crash_and_rerun
from runjournal.journal import BackendUnavailable, JournalBackend, JournalCorrupt, TransientError
from runjournal.journal.testing import JournalBackendTests, Opener, make_entry, make_invocation

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sqlite_backend.py"


def _load_example() -> ModuleType:
    # Imported by path, as the module "sqlite_backend", so dotted-path
    # registration ("sqlite_backend:SQLiteBackend") finds the same module.
    if "sqlite_backend" in sys.modules:
        return sys.modules["sqlite_backend"]
    spec = importlib.util.spec_from_file_location("sqlite_backend", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sqlite_backend"] = module
    spec.loader.exec_module(module)
    return module


sqlite_backend = _load_example()
SQLiteBackend: Any = sqlite_backend.SQLiteBackend


def _flip_last_byte(path: str, sql_select: str, sql_update: str, key: tuple[Any, ...]) -> None:
    with sqlite3.connect(path) as conn:
        (data,) = conn.execute(sql_select, key).fetchone()
        conn.execute(sql_update, (data[:-1] + bytes([data[-1] ^ 0xFF]), *key))
    conn.close()


class TestSQLiteBackend(JournalBackendTests):
    @pytest.fixture
    def open_backend(self, tmp_path: Path) -> Opener:
        url = f"sqlite://{tmp_path / 'journal.db'}"
        return lambda: SQLiteBackend.from_url(url)

    def corrupt_entry(self, backend: JournalBackend, invocation_id: str, index: int) -> None:
        _flip_last_byte(
            backend.path,  # type: ignore[attr-defined]
            "SELECT record FROM entries WHERE invocation_id = ? AND idx = ?",
            "UPDATE entries SET record = ? WHERE invocation_id = ? AND idx = ?",
            (invocation_id, index),
        )

    def corrupt_invocation(self, backend: JournalBackend, invocation_id: str) -> None:
        _flip_last_byte(
            backend.path,  # type: ignore[attr-defined]
            "SELECT record FROM invocations WHERE id = ?",
            "UPDATE invocations SET record = ? WHERE id = ?",
            (invocation_id,),
        )


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def sqlite_registered() -> Iterator[None]:
    _registry._reset()
    register_backend("sqlite", "sqlite_backend:SQLiteBackend")
    yield
    _registry._reset()


def test_opened_by_url_through_the_registry(in_tmp_cwd: Path, sqlite_registered: None) -> None:
    path = in_tmp_cwd / "nested dir" / "j.db"
    url = f"sqlite://{str(path).replace(' ', '%20')}?timeout=2.5&synchronous=normal"
    backend = open_backend(url)
    try:
        assert isinstance(backend, SQLiteBackend)
        assert backend.path == str(path) and path.is_file()
        assert backend._timeout == 2.5 and backend._synchronous == "NORMAL"
    finally:
        backend.close()
    relative = open_backend({"url": "sqlite://rel/j.db", "options": {"timeout": 1}})
    relative.close()
    assert (in_tmp_cwd / "rel" / "j.db").is_file()


@pytest.mark.parametrize(
    ("url", "options", "error", "message"),
    [
        ("sqlite://", {}, ValueError, "names no file"),
        ("sqlite:///tmp/dir/", {}, ValueError, "names no file"),
        ("sqlite:///tmp/x.db", {"colour": "red"}, TypeError, r"sqlite://.*'colour'.*timeout"),
        ("sqlite:///tmp/x.db", {"timeout": "soon"}, ValueError, "timeout option .* 'soon'"),
        ("sqlite:///tmp/x.db", {"synchronous": "YES"}, ValueError, "synchronous option"),
    ],
)
def test_bad_urls_and_options_are_named(
    sqlite_registered: None,
    in_tmp_cwd: Path,
    url: str,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        open_backend(url, **options)


def test_a_file_that_is_not_a_database_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db"
    path.write_bytes(b"this is not a sqlite file at all" * 100)
    with pytest.raises(JournalCorrupt, match="not a database"):
        SQLiteBackend(path)


def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(BackendUnavailable, match="schema version 99"):
        SQLiteBackend(path)


def test_a_lock_held_too_long_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    backend = SQLiteBackend(path, timeout=0.05)
    backend.create_invocation(make_invocation("inv"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(TransientError, match="busy"):
            backend.append_entry("inv", make_entry(0))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    backend.append_entry("inv", make_entry(0))  # the pooled connection is usable again
    assert [e.index for e in backend.read_entries("inv")] == [0]
    backend.close()


def test_a_handler_survives_a_crash_on_sqlite(tmp_path: Path) -> None:
    calls: list[str] = []
    rt = Runtime(SQLiteBackend(tmp_path / "j.db"))

    @rt.handler("pay")
    def pay(ctx: Context, amount: int) -> str:
        for name in ("reserve", "charge", "receipt"):

            def closure(name: str = name) -> str:
                calls.append(name)
                return f"{name}:{amount}"

            ctx.run(closure, name=name)
        return "paid"

    report = crash_and_rerun(rt, "pay", 30, step="charge")
    assert report.output == "paid"
    assert report.called_again == ()
    assert calls == ["reserve", "charge", "receipt"]
    rt.backend.close()
    # A new client on the same file (a restarted process) sees the outcome.
    with SQLiteBackend(tmp_path / "j.db") as reopened:
        again = Runtime(reopened)
        again.handler("pay")(pay)
        assert again.invoke("pay", 30, invocation_id=report.invocation_id) == "paid"
    assert calls == ["reserve", "charge", "receipt"]
