"""Progress of a long command: a bar redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Reports ``done`` of ``total`` on ``stream``.

    On a terminal: one line redrawn with a carriage return (at most every
    ``tty_every`` seconds), ended by a newline in :meth:`finish`. Otherwise
    (a pipe, a log file): a plain line at most every ``every`` seconds, and
    one at the end.
    """

    def __init__(
        self,
        stream: TextIO,
        what: str,
        *,
        width: int = 30,
        every: float = 1.0,
        tty_every: float = 0.1,
    ) -> None:
        self.stream = stream
        self.what = what
        self.width = width
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.every = tty_every if self.tty else every
        self._last = float("-inf")
        self._shown: tuple[int, int] | None = None

    def update(self, done: int, total: int, note: str = "") -> None:
        """Report progress; drawn only if enough time passed since the last report."""
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        self._draw(done, total, note)

    def finish(self, done: int, total: int, note: str = "") -> None:
        """Report the end (always drawn, once)."""
        if self._shown != (done, total):
            self._draw(done, total, note)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, done: int, total: int, note: str) -> None:
        self._shown = (done, total)
        tail = f" {note}" if note else ""
        if not self.tty:
            self.stream.write(f"{self.what}: {done}/{total}{tail}\n")
        else:
            filled = self.width if total == 0 else int(self.width * done / total)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.what} [{bar}] {done}/{total}{tail}\x1b[K")
        self.stream.flush()
