"""A worker process for tests/test_retries_crash.py: ``python tests/retry_child.py CONFIG.json``.

It opens the journal at ``url`` and runs the handler ``pay``: one step,
``charge``, run with the run options ``options``. Each call of the step's
closure appends one JSON line to ``ledger`` (O_APPEND): the process id, the
attempt, the idempotency key, the wall-clock time. The closure succeeds from
attempt ``succeed_at`` on (never if None) and otherwise raises ConnectionError;
at attempt ``hold_attempt`` it instead creates the file ``held`` and blocks,
waiting for the parent to SIGKILL it.

``mode`` is ``invoke`` (invoke ``invocation_id``) or ``recover``
(``rt.recover()``). What came out is written to ``report`` as one JSON object.
Every wait is bounded: a bug fails the test, never hangs it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from runjournal import Context, Runtime, current_step

#: The longest any wait of this process lasts.
LIMIT = 60.0


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def describe(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    return {"type": type(exc).__name__, "message": str(exc)}


def main(config: dict[str, Any]) -> None:
    hold_attempt = config.get("hold_attempt")
    succeed_at = config.get("succeed_at")

    def charge() -> str:
        step = current_step()
        record = {
            "pid": os.getpid(),
            "attempt": step.attempt,
            "key": step.idempotency_key,
            "index": step.index,
            "invocation": step.invocation_id,
            "at": time.time(),
        }
        append_line(config["ledger"], json.dumps(record) + "\n")
        if step.attempt == hold_attempt:
            write_atomically(config["held"], str(os.getpid()))
            time.sleep(LIMIT)  # the parent kills this process here
            os._exit(3)
        if succeed_at is None or step.attempt < succeed_at:
            raise ConnectionError(f"gateway down (attempt {step.attempt})")
        return f"charged at attempt {step.attempt}"

    rt = Runtime(config["url"], worker_id=config.get("worker_id"))

    @rt.handler("pay")
    def pay(ctx: Context, order: Any) -> Any:
        return ctx.run(charge, name="charge", **config["options"])

    report: dict[str, Any] = {"pid": os.getpid(), "worker_id": rt.worker_id}
    try:
        if config["mode"] == "invoke":
            try:
                report["output"] = rt.invoke(
                    "pay", config["input"], invocation_id=config["invocation_id"], timeout=LIMIT / 4
                )
            except Exception as exc:
                report["error"] = describe(exc)
        else:
            report["recovered"] = [
                {
                    "invocation_id": r.invocation_id,
                    "status": r.status.value,
                    "output": r.output,
                    "error": describe(r.error),
                    "skipped": r.skipped,
                    "running": r.running,
                }
                for r in rt.recover(timeout=LIMIT / 4)
            ]
    finally:
        rt.close()
    write_atomically(config["report"], json.dumps(report))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f))
