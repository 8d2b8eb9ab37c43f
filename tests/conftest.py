"""Shared fixtures: a fake clock and a Runtime on the memory engine."""

from __future__ import annotations

import attrs
import pytest

from backends import MemoryBackend
from context import Runtime


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
