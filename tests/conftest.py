"""Shared fixtures: a fake clock, a Runtime on the memory engine, a moto S3 server."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from runjournal.backends import MemoryBackend
from runjournal.context import Runtime


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
