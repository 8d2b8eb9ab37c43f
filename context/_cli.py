"""The ``runjournal`` command: ``runjournal demo`` plays the seed's order story."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from context._context import Context
from context._runtime import Runtime

__all__ = ["main"]


class SimulatedCrash(Exception):
    """Stands for the process dying right after the shipment was scheduled."""


class ShippingAPI:
    """A flaky external API that counts how often a shipment was really scheduled."""

    def __init__(self, failures_before_success: int = 2) -> None:
        self.failures_left = failures_before_success
        self.scheduled: list[str] = []

    def schedule(self, order: dict[str, Any]) -> str:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("shipping API timed out")
        tracking = f"TRK-{order['id']}-{len(self.scheduled) + 1}"
        self.scheduled.append(tracking)
        return tracking


def build_runtime(url: str, shipping: ShippingAPI, crash: list[bool]) -> Runtime:
    """The demo's service: one durable handler, ``orders.process``."""
    rt = Runtime(url)

    @rt.handler("orders.process")
    def process_order(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        ctx.run_void(
            lambda: print(f"  analytics: order {order['id']} received"), name="log-analytics"
        )
        tracking = ctx.run(
            lambda: shipping.schedule(order),
            name="schedule-shipment",
            max_retry_attempts=5,
            initial_retry_interval=0.01,
        )
        print(f"  shipment scheduled: {tracking}")
        if crash[0]:
            crash[0] = False
            print("  !! the process crashes before finishing the order")
            raise SimulatedCrash
        receipt = ctx.run(lambda: f"mail-to-{order['email']}", name="send-confirmation")
        return {"order": order["id"], "tracking": tracking, "receipt": receipt}

    return rt


def demo(url: str) -> int:
    """Run the order story on ``url``; return 0 when the shipment ran exactly once."""
    shipping = ShippingAPI()
    crash = [True]
    order = {"id": 42, "email": "ada@example.com"}
    with build_runtime(url, shipping, crash) as rt:
        print(f"journal: {url}")
        print("attempt 1:")
        try:
            rt.invoke("orders.process", order, invocation_id="order-42")
        except SimulatedCrash:
            status = rt.status("order-42")
            print(f"  invocation order-42 is {status.value if status else 'missing'}")
        print("attempt 2 (recovery replays the journal):")
        [result] = rt.recover()
        print(f"  result: {result.output}")
        entries = rt.backend.read_entries("order-42")
        print("journal entries:")
        for e in entries:
            print(f"  #{e.index} {e.name:<18} attempts={e.attempts} payload={e.payload!r}")
    ok = len(shipping.scheduled) == 1
    print(
        f"shipments actually scheduled: {len(shipping.scheduled)} "
        f"({'exactly once' if ok else 'DUPLICATED'})"
    )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runjournal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="crash an order handler and watch it resume")
    p_demo.add_argument("--journal", default="memory://demo", help="journal URL")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="  %(levelname)s %(message)s", stream=sys.stdout
    )
    if args.command == "demo":
        return demo(args.journal)
    return 2


if __name__ == "__main__":
    sys.exit(main())
