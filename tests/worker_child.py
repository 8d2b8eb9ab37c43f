"""A worker process for tests/test_workers.py: ``python tests/worker_child.py CONFIG.json``.

It opens the journal at ``url``, registers the handler ``work`` and does what
the config says, reporting through files (never through its exit alone):

- every step closure appends one line ``<invocation> <step> <tag> <pid> <wall time>``
  to the ``ledger`` (O_APPEND), then sleeps ``step_sleep`` seconds; the closure of
  step ``hold_step`` instead waits until the file ``hold_file`` exists (a stalled
  or a gated step);
- ``events`` gets one JSON line per thing worth knowing while it runs
  (``ready``, ``invoking``, ``lease_lost`` with the step that raised it);
- ``report`` gets one JSON object when it is done: what every ``invoke``
  returned or raised, what ``recover`` returned, WARNING records of the
  ``runjournal`` logger.

Config keys: url, tag, ledger, events, report (paths); worker_id (None: the
default id), lease, steps, step_sleep, hold_step, hold_file, go (a file to
wait for before working), start_recovery (an interval, or None), recover
(call ``rt.recover()`` once before invoking), invoke (ids to invoke, each in
a thread of its own), wait_complete (ids to wait for until completed, then
invoke), final_recover (call ``rt.recover()`` again at the end).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

from runjournal import Context, InvocationStatus, LeaseLost, Runtime

#: The longest any wait of this process lasts: a bug fails the test, never hangs it.
LIMIT = 60.0


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def wait_for_file(path: str) -> bool:
    deadline = time.monotonic() + LIMIT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Warnings(logging.Handler):
    """Keeps the WARNING (and worse) records of the runjournal logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def main(config: dict[str, Any]) -> None:
    tag = config["tag"]
    pid = os.getpid()
    ledger, events = config["ledger"], config["events"]
    hold_step, hold_file = config.get("hold_step"), config.get("hold_file", "")
    step_sleep = float(config.get("step_sleep", 0.0))
    steps = int(config.get("steps", 3))

    def event(kind: str, **fields: Any) -> None:
        line = json.dumps({"tag": tag, "event": kind, "t": time.time(), **fields})
        append_line(events, line + "\n")

    warnings = Warnings()
    logging.getLogger("runjournal").addHandler(warnings)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    rt = Runtime(config["url"], worker_id=config.get("worker_id"), lease=config.get("lease", 30.0))

    @rt.handler("work")
    def work(ctx: Context, spec: dict[str, Any]) -> list[str]:
        inv = ctx.invocation_id
        out = []
        for i in range(spec["steps"]):

            def step(i: int = i) -> str:
                append_line(ledger, f"{inv} {i} {tag} {pid} {time.time():.6f}\n")
                if i == hold_step:
                    wait_for_file(hold_file)
                elif step_sleep:
                    time.sleep(step_sleep)
                return f"{inv}/{i}/{tag}"

            try:
                out.append(ctx.run(step, name=f"step-{i}"))
            except LeaseLost as exc:
                event("lease_lost", invocation=inv, step=i, error=str(exc))
                raise
        return out

    report: dict[str, Any] = {"tag": tag, "pid": pid, "worker_id": rt.worker_id}
    if config.get("start_recovery") is not None:
        rt.start_recovery(interval=config["start_recovery"])
    event("ready", worker_id=rt.worker_id)
    if config.get("go") and not wait_for_file(config["go"]):
        raise SystemExit("no go file")

    def recover() -> list[dict[str, Any]]:
        return [
            {
                "id": r.invocation_id,
                "status": r.status.value,
                "output": r.output,
                "error": None if r.error is None else describe(r.error),
                "skipped": r.skipped,
                "running": r.running,
            }
            for r in rt.recover(timeout=LIMIT)
        ]

    if config.get("recover"):
        report["recover"] = recover()

    results: dict[str, Any] = {}

    def invoke(inv_id: str) -> None:
        try:
            output = rt.invoke("work", {"steps": steps}, invocation_id=inv_id, timeout=LIMIT)
        except BaseException as exc:
            results[inv_id] = {"error": describe(exc), "t": time.time()}
        else:
            results[inv_id] = {"output": output, "t": time.time()}

    threads = [threading.Thread(target=invoke, args=(i,)) for i in config.get("invoke", [])]
    for thread in threads:
        thread.start()
    event("invoking")
    for inv_id in config.get("wait_complete", []):
        deadline = time.monotonic() + LIMIT
        while rt.status(inv_id) is not InvocationStatus.COMPLETED:
            if time.monotonic() > deadline:
                raise SystemExit(f"{inv_id} did not complete")
            time.sleep(0.01)
        results[f"completed:{inv_id}"] = {"t": time.time()}
    for thread in threads:
        thread.join(LIMIT + 5)
    for inv_id in config.get("wait_complete", []):
        invoke(inv_id)
    report["invoke"] = results
    if config.get("final_recover"):
        report["final_recover"] = recover()
    rt.close()
    report["warnings"] = warnings.seen
    tmp = config["report"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, config["report"])


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        conf = json.load(f)
    try:
        main(conf)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
