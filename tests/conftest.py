"""Shared fixtures: a fake clock, a Runtime on the memory engine, a moto S3 server."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from runjournal.backends import MemoryBackend, open_backend
from runjournal.context import Runtime
from runjournal.journal import JournalBackend


@attrs.define
class FakeClock:
    """A clock whose sleeps only advance its own time, and are recorded."""

    now: float = 0.0
    sleeps: list[float] = attrs.Factory(list)

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def rt(backend: MemoryBackend, clock: FakeClock) -> Runtime:
    return Runtime(backend, clock=clock)


@pytest.fixture(scope="session")
def moto() -> Iterator[Any]:
    """A moto S3 server over HTTP on 127.0.0.1, one per test session."""
    from runjournal.backends.s3.testing import running_moto

    with running_moto() as server:
        yield server


@pytest.fixture(scope="session")
def bucket(moto: Any) -> str:
    name: str = moto.new_bucket()
    return name


@pytest.fixture
def new_s3_backend(moto: Any, bucket: str) -> Iterator[Callable[[], Any]]:
    """Opens S3 engine clients, each on a fresh prefix of the session's bucket."""
    from runjournal.backends.s3 import S3Backend

    opened: list[Any] = []

    def make() -> Any:
        backend = S3Backend(moto.client(), bucket, f"t-{uuid.uuid4().hex[:12]}", owns_client=True)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


# -- every engine ----------------------------------------------------------------
#
# Each engine is a factory taking a fresh directory and returning an open,
# empty backend; "s3" opens a fresh prefix on the session's moto server
# (tests/conftest.py).


def _memory(path: Path) -> JournalBackend:
    return MemoryBackend()


def _lmdb(path: Path) -> JournalBackend:
    pytest.importorskip(
        "runjournal.backends.lmdb", reason="runjournal.backends.lmdb is not available"
    )
    return open_backend(f"lmdb://{path}")


ENGINES: dict[str, Callable[[Path], JournalBackend]] = {
    "memory": _memory,
    "lmdb": _lmdb,
}


@pytest.fixture(params=[*sorted(ENGINES), "s3"])
def new_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], JournalBackend]]:
    """Opens fresh, empty backends of one engine; closes them afterwards."""
    opened: list[JournalBackend] = []
    if request.param == "s3":
        open_s3: Callable[[], JournalBackend] = request.getfixturevalue("new_s3_backend")

    def make() -> JournalBackend:
        if request.param == "s3":
            return open_s3()  # the fixture closes its own clients
        backend = ENGINES[request.param](tmp_path / f"journal-{len(opened)}")
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


@pytest.fixture(params=[*sorted(ENGINES), "s3"])
def one_journal(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], JournalBackend]]:
    """Opens new clients on one fresh journal of one engine (two calls: two workers)."""
    opened: list[JournalBackend] = []
    if request.param == "s3":
        from runjournal.backends.s3 import S3Backend

        server = request.getfixturevalue("moto")
        bucket = request.getfixturevalue("bucket")
        prefix = f"t-{uuid.uuid4().hex[:12]}"

        def make() -> JournalBackend:
            client = S3Backend(server.client(), bucket, prefix, owns_client=True)
            opened.append(client)
            return client

    elif request.param == "memory":
        from runjournal.backends import MemoryStore

        store = MemoryStore()

        def make() -> JournalBackend:
            client = MemoryBackend(store)
            opened.append(client)
            return client

    else:
        path = tmp_path / "journal"

        def make() -> JournalBackend:
            client = ENGINES[request.param](path)
            opened.append(client)
            return client

    yield make
    for client in opened:
        client.close()
