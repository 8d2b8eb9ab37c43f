"""The ``runjournal`` command (also ``python -m runjournal``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
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
    add_check_command(sub.add_parser)
    operating = add_commands(sub.add_parser)  # ls, show, stats, purge, compact, recover, worker
    args = parser.parse_args(argv)
    if args.command in operating:
        return run_command(args)
    if args.command == "check":
        return check(args.url, json_output=args.json, timeout=args.timeout)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"  [pid {os.getpid()}] %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    if args.command == "demo":
        return demo(args.journal)
    return worker(args.journal, args.ledger, args.crash)


def add_check_command(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    """``runjournal check URL``: walk every page and record of an LMDB journal.

    Args:
        add_parser: the ``add_parser`` of the command's subparsers.
    """
    p_check = add_parser(
        "check",
        help="check an LMDB journal's files (safely, in a child process); one line per problem",
    )
    p_check.add_argument("url", help="lmdb:///abs/path, lmdb://rel/path, or the directory")
    p_check.add_argument("--json", action="store_true", help="print the report as JSON")
    p_check.add_argument("--timeout", type=float, help="give up after this many seconds")


def check(url: str, *, json_output: bool = False, timeout: float | None = None) -> int:
    """Print what is wrong with the LMDB journal at ``url``: 0 if nothing, 1 if anything."""
    try:
        from runjournal.backends.lmdb import verify
    except ImportError as exc:
        print(f"runjournal check: {exc}; pip install 'runjournal[lmdb]'", file=sys.stderr)
        return 2
    if "://" in url and not url.startswith("lmdb://"):
        print(f"runjournal check: only lmdb:// journals can be checked: {url!r}", file=sys.stderr)
        return 2
    try:
        report = verify(url, timeout=timeout)
    except ValueError as exc:
        print(f"runjournal check: {exc}", file=sys.stderr)
        return 2
    if json_output:
        print(
            json.dumps(
                {
                    "path": report.path,
                    "ok": report.ok,
                    "invocations": report.invocations,
                    "entries": report.entries,
                    "pages": report.pages,
                    "problems": [{"where": p.where, "what": p.what} for p in report.problems],
                },
                indent=2,
            )
        )
    else:
        print(report)
    return 0 if report.ok else 1
