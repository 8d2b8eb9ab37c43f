"""The demo: ``runjournal demo``.

It plays the seed's order story for real: a worker process
logs the order, schedules a shipment through a flaky API (retried), and is
killed right after; a second process resumes the invocation from the journal,
and the shipment is not scheduled again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from runjournal.context import Context, Runtime

__all__ = ["demo", "worker"]

ORDER = {"id": 42, "email": "ada@example.com", "items": ["tea", "scones"]}
INVOCATION = "order-42"
WORKER = "orders-worker-1"


def _say(text: str) -> None:
    print(f"  [pid {os.getpid()}] {text}", flush=True)


class ShippingAPI:
    """A flaky external API. Every shipment it really schedules is appended to a file."""

    def __init__(self, ledger: Path, failures_before_success: int) -> None:
        self.ledger = ledger
        self.failures_left = failures_before_success

    def schedule(self, order: dict[str, Any]) -> str:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("shipping API timed out")
        with self.ledger.open("a") as f:
            f.write(f"scheduled shipment for order {order['id']}\n")
        return f"TRK-{order['id']}-{os.getpid()}"


def build_runtime(journal: str, shipping: ShippingAPI, crash_after_shipment: bool) -> Runtime:
    """The demo service: one durable handler, ``orders.process``."""
    # One worker id for both processes: the second is the first one restarted, so it
    # takes back at once what the first held (another worker would wait out its lease).
    rt = Runtime(journal, worker_id=WORKER)

    @rt.handler("orders.process")
    def process_order(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        ctx.run_void(lambda: _say(f"analytics: order {order['id']} received"), name="log-analytics")
        tracking = ctx.run(
            lambda: shipping.schedule(order),
            name="schedule-shipment",
            max_retry_attempts=5,
            initial_retry_interval=0.05,
        )
        _say(f"shipment: {tracking}")
        if crash_after_shipment:
            _say("killed right after the shipment (os._exit: no cleanup, no exception)")
            os._exit(1)
        receipt = ctx.run(lambda: f"mail-to-{order['email']}", name="send-confirmation")
        _say(f"confirmation: {receipt}")
        return {"order": order["id"], "tracking": tracking, "receipt": receipt}

    return rt


def worker(journal: str, ledger: Path, crash: bool) -> int:
    """One process of the demo: start the order (and die), or recover it."""
    shipping = ShippingAPI(ledger, failures_before_success=2 if crash else 0)
    with build_runtime(journal, shipping, crash_after_shipment=crash) as rt:
        if crash:
            rt.invoke("orders.process", ORDER, invocation_id=INVOCATION)
            return 0  # not reached: the process is killed inside the handler
        for result in rt.recover():
            _say(f"recovered {result.invocation_id}: {result.status.value} -> {result.output}")
    return 0


def demo(journal: str | None) -> int:
    """Run the story in two real processes; return 0 when the shipment ran exactly once."""
    workdir = Path(tempfile.mkdtemp(prefix="runjournal-demo-"))
    try:
        return _play(journal or f"lmdb://{workdir / 'journal'}", workdir / "shipments.log")
    finally:
        if journal is None:
            print(f"(the journal stays in {workdir} for you to look at)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _play(journal: str, ledger: Path) -> int:
    print(f"journal: {journal}")
    with Runtime(journal) as rt:
        if rt.status(INVOCATION) is not None:
            print(f"this journal already holds {INVOCATION}; give the demo a new journal")
            return 2

    def run_worker(*extra: str) -> int:
        command = [sys.executable, "-m", "runjournal", "demo-worker", journal, str(ledger)]
        return subprocess.run([*command, *extra], check=False).returncode

    print("process 1 starts order-42:")
    code = run_worker("--crash")
    print(f"process 1 died (exit status {code}); the journal holds what it finished.")
    print(f"process 2, the same worker ({WORKER}) restarted, runs rt.recover():")
    if run_worker() != 0:
        print("process 2 failed")
        return 1
    with Runtime(journal) as rt:
        print("journal of order-42:")
        for e in rt.backend.read_entries(INVOCATION):
            print(f"  #{e.index} {e.name:<18} attempts={e.attempts} value={e.payload!r}")
        status = rt.status(INVOCATION)
    shipments = ledger.read_text().splitlines() if ledger.exists() else []
    ok = len(shipments) == 1 and status is not None and status.value == "completed"
    print(
        f"shipments really scheduled: {len(shipments)} "
        f"({'exactly once' if ok else 'NOT exactly once'}); order-42 is "
        f"{status.value if status else 'missing'}"
    )
    return 0 if ok else 1
