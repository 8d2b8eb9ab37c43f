"""The pytest plugin runjournal installs (entry-point group ``pytest11``, name ``runjournal``).

Fixtures:

``runjournal_runtime``
    A :class:`~runjournal.Runtime` on a fresh in-memory journal, with retry
    waits off (:func:`~runjournal.set_testing`); closed after the test.
``runjournal_backend``
    That runtime's journal, to look at what was recorded.
``runjournal_crash``
    :func:`runjournal.context.testing.crash_and_rerun` bound to ``runjournal_runtime``.
``runjournal_testing``
    Only turns retry waits off for the test (retries still happen).

The crash tools themselves live in :mod:`runjournal.context.testing`, which
does not need pytest.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from runjournal.context import Runtime, is_testing, set_testing
from runjournal.context.testing import CrashHelper, crash_and_rerun
from runjournal.journal import JournalBackend

__all__ = ["runjournal_backend", "runjournal_crash", "runjournal_runtime", "runjournal_testing"]


@pytest.fixture
def runjournal_testing() -> Iterator[None]:
    """Retry waits off for this test (retries still happen); restored afterwards."""
    was = is_testing()
    set_testing(True)
    try:
        yield
    finally:
        set_testing(was)


@pytest.fixture
def runjournal_runtime(runjournal_testing: None) -> Iterator[Runtime]:
    """A Runtime on a fresh in-memory journal, retry waits off; closed afterwards."""
    runtime = Runtime("memory://")
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture
def runjournal_backend(runjournal_runtime: Runtime) -> JournalBackend:
    """The journal of ``runjournal_runtime``, to inspect what was recorded."""
    return runjournal_runtime.backend


@pytest.fixture
def runjournal_crash(runjournal_runtime: Runtime) -> CrashHelper:
    """:func:`crash_and_rerun` bound to ``runjournal_runtime``."""
    return functools.partial(crash_and_rerun, runjournal_runtime)
