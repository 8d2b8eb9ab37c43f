"""The ``runjournal`` logger, and the fields every one of its records carries.

Every record the run/retry core logs has the attributes ``invocation_id``,
``handler``, ``step``, ``index``, ``attempt`` and ``worker_id`` (None where they
do not apply), so a formatter or a JSON log handler can use them on any
record: ``%(invocation_id)s`` never fails. Messages name the invocation too,
for people reading plain text.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["FIELDS", "emit", "log"]

log = logging.getLogger("runjournal")

#: The structured fields of every record of the ``runjournal`` logger.
FIELDS = ("invocation_id", "handler", "step", "index", "attempt", "worker_id")


def emit(
    level: int,
    message: str,
    *args: Any,
    invocation_id: str | None = None,
    handler: str | None = None,
    step: str | None = None,
    index: int | None = None,
    attempt: int | None = None,
    worker_id: str | None = None,
    exc_info: bool = False,
) -> None:
    """Log ``message % args`` on the ``runjournal`` logger with every structured field."""
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        message,
        *args,
        exc_info=exc_info,
        stacklevel=2,
        extra={
            "invocation_id": invocation_id,
            "handler": handler,
            "step": step,
            "index": index,
            "attempt": attempt,
            "worker_id": worker_id,
        },
    )
