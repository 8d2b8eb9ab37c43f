"""The ``runjournal`` commands for operating a journal: ls, show, stats, purge, compact,
recover and worker (registered on the command line by ``runjournal._cli``).

Every command: ``--json`` prints one JSON document for scripts; a failure is
one line on stderr and a non-zero exit (1: the journal or the request failed,
2: the command line is wrong); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from runjournal._cli_ops._commands import compact, ls, purge, recover, show, stats, worker
from runjournal._cli_ops._journal import CommandError, default_url
from runjournal._cli_ops._timeline import HELP as TIMELINE_HELP
from runjournal.journal import JournalError

__all__ = ["COMMANDS", "add_commands", "run_command"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ls": ls,
    "show": show,
    "stats": stats,
    "purge": purge,
    "compact": compact,
    "recover": recover,
    "worker": worker,
}

_URL_HELP = "journal URL (default: $RUNJOURNAL_URL, else lmdb://.runjournal, as Runtime())"


def _common(*, url: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    if url:
        parent.add_argument("--url", default=None, help=_URL_HELP)
    parent.add_argument("--json", action="store_true", help="print one JSON document")
    parent.add_argument(
        "--debug", action="store_true", help="show tracebacks and the journal's debug logs"
    )
    return parent


def add_commands(add_parser: Callable[..., argparse.ArgumentParser]) -> set[str]:
    """Add the operating commands to a ``runjournal`` command line.

    Args:
        add_parser: the ``add_parser`` of the command line's subparsers.

    Returns:
        The names of the commands added (dispatch them with :func:`run_command`).
    """
    journal = _common(url=True)
    app = _common(url=False)
    p = add_parser(
        "ls",
        parents=[journal],
        help="list invocations, newest first: id, handler, status, steps, age, lease",
    )
    p.add_argument("--status", choices=["pending", "completed", "failed"])
    p.add_argument("--handler", metavar="NAME", help="only this handler's invocations")
    p.add_argument(
        "--limit", type=int, default=50, metavar="N", help="show the N newest (50; 0: all)"
    )
    p.add_argument(
        "--workers", action="store_true", help="list workers' liveness records too (hidden)"
    )
    p = add_parser(
        "show",
        parents=[journal],
        help="one invocation: its entries, outcomes, failures, and a timeline",
        description="Show one invocation, each journaled step, and a timeline.\n\n" + TIMELINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("id", help="the invocation id")
    add_parser(
        "stats",
        parents=[journal],
        help="counts by status, journal size, oldest pending invocation, workers",
    )
    p = add_parser(
        "purge",
        parents=[journal],
        help="remove old finished invocations and their entries",
        description="Remove invocations (with their entries) finished longer ago than "
        "--older-than. Pending invocations are never touched unless --include-pending is "
        "given, and never one a live worker holds. Progress goes to stderr: a bar on a "
        "terminal, plain lines otherwise.",
    )
    p.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="e.g. 7d, 12h, 30m, 90s, 1h30m (plain numbers are seconds)",
    )
    p.add_argument(
        "--status",
        default="completed,failed",
        metavar="LIST",
        help="comma-separated statuses to remove (default: completed,failed)",
    )
    p.add_argument(
        "--include-pending",
        action="store_true",
        help="remove old pending invocations too (those no live worker holds)",
    )
    p.add_argument("--dry-run", action="store_true", help="remove nothing; say what would go")
    p = add_parser(
        "compact",
        parents=[journal],
        help="write a compacted copy of an LMDB journal (to give disk space back)",
        description="LMDB never shrinks its file: space freed by purge is reused for new "
        "records, not given back. This writes a compacted copy to a new directory and says "
        "how to swap it in once every process using the journal is stopped; the journal in "
        "use is not touched.",
    )
    p.add_argument("--to", metavar="DIR", help="where to write it (default: <journal>.compacted)")
    p = add_parser(
        "recover",
        parents=[app],
        help="resume orphaned invocations once, with APP's handlers",
    )
    p.add_argument("app", metavar="APP", help="module:attribute of your Runtime, e.g. shop:rt")
    p.add_argument("--timeout", metavar="AGE", help="stop waiting after this long (e.g. 30s)")
    p = add_parser(
        "worker",
        parents=[app],
        help="keep recovering orphaned invocations with APP's handlers until SIGTERM/SIGINT",
    )
    p.add_argument("app", metavar="APP", help="module:attribute of your Runtime, e.g. shop:rt")
    p.add_argument(
        "--interval", metavar="AGE", help="how often to look (default: a third of the lease)"
    )
    return set(COMMANDS)


def run_command(args: argparse.Namespace) -> int:
    """Run the operating command ``args.command``; print a failure as one line.

    Returns:
        The exit status.
    """
    name = args.command
    debug = bool(getattr(args, "debug", False))
    if getattr(args, "url", "") is None:
        args.url = default_url()
    level = logging.INFO if name == "worker" else logging.WARNING if name == "recover" else 100
    logging.basicConfig(
        level=logging.DEBUG if debug else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[name](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"runjournal {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"runjournal {name}: {_one_line(exc)}", file=sys.stderr)
        return exc.code if isinstance(exc, CommandError) else 1


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, (CommandError, JournalError)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text} (--debug shows the traceback)"
