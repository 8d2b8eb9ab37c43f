"""The resize gate: many transactions at once, or one map resize alone."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["ResizeGate"]


class ResizeGate:
    """Lets many transactions run at once, and a map resize run alone.

    LMDB's ``set_mapsize`` requires that no transaction of this process be
    open. Every transaction runs between :meth:`enter` and :meth:`exit`; a
    resize runs through :meth:`exclusive`, which waits for the open ones to
    exit and holds new ones back until it is done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    def enter(self) -> None:
        """Wait for a resize under way, if any, then count one more transaction."""
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def exit(self) -> None:
        """Count one transaction fewer (a waiting resize may then start)."""
        with self._cond:
            self._active -= 1
            if not self._active and self._resizing:
                self._cond.notify_all()

    def exclusive(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` while no transaction is open; new ones wait until it returns."""
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
