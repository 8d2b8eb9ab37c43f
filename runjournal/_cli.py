"""The ``runjournal`` command (also ``python -m runjournal``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from runjournal._cli_ops import add_commands, run_command
from runjournal._demo import demo, worker

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="runjournal", description="Durable side effects for Python services."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p_demo = sub.add_parser(
        "demo", help="crash an order handler in one process, finish it in another"
    )
    p_demo.add_argument("--journal", help="journal URL (default: LMDB in a new temp directory)")
    p_worker = sub.add_parser("demo-worker")  # one process of the demo; not listed
    p_worker.add_argument("journal")
    p_worker.add_argument("ledger", type=Path)
    p_worker.add_argument("--crash", action="store_true")
    operating = add_commands(sub.add_parser)  # ls, show, stats, purge, compact, recover, worker
    args = parser.parse_args(argv)
    if args.command in operating:
        return run_command(args)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"  [pid {os.getpid()}] %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    if args.command == "demo":
        return demo(args.journal)
    return worker(args.journal, args.ledger, args.crash)
