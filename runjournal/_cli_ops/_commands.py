"""The operating commands: ls, show, stats, purge, compact, recover, worker.

Each takes the parsed arguments and returns the exit status; what it prints
for people goes to stdout (progress to stderr), ``--json`` prints one JSON
document to stdout instead. Failures are raised as :class:`CommandError` or
journal errors; ``run_command`` turns them into one line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar

from runjournal._cli_ops._app import load_runtime
from runjournal._cli_ops._journal import (
    CommandError,
    journal_size,
    lmdb_path,
    open_journal,
)
from runjournal._cli_ops._progress import Progress
from runjournal._cli_ops._timeline import Bar, bars, render, span_of
from runjournal._cli_ops._units import (
    format_bytes,
    format_clock,
    format_seconds,
    parse_duration,
)
from runjournal._cli_ops._values import failure_json, failure_text, value_json, value_text
from runjournal.context import WORKER_PREFIX, PurgeStep, RecoveryResult, Runtime, is_worker_record
from runjournal.context._futures import read_decision
from runjournal.context._lease import RELEASED
from runjournal.context._purge import holder_of
from runjournal.journal import (
    Entry,
    EntryKind,
    Invocation,
    InvocationStatus,
    JournalBackend,
    JournalCorrupt,
    Lease,
)

__all__ = ["compact", "ls", "purge", "recover", "show", "stats", "worker"]

T = TypeVar("T")
R = TypeVar("R")

#: How many journal reads ls and stats make at once (S3: parallel requests).
_READERS = 8


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False, default=repr))


def _parallel(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    if len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="runjournal-cli") as pool:
        return list(pool.map(fn, items))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> list[str]:
    rows = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[col]) if col in right else cell.ljust(widths[col])
            for col, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


class _Holders:
    """Who holds a lease, asking the journal at most once per owner."""

    def __init__(self, backend: JournalBackend, now: float) -> None:
        self.backend = backend
        self.now = now
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int], bool] = {}

    def held(self, lease: Lease) -> bool:
        key = (lease.owner, lease.incarnation)
        with self._lock:
            if key in self._known:
                return self._known[key]
        answer = holder_of(self.backend, lease, self.now) is not None
        with self._lock:
            self._known[key] = answer
        return answer


def _lease_text(inv: Invocation, holders: _Holders) -> str:
    lease = inv.lease
    if lease is None or inv.status is not InvocationStatus.PENDING or is_worker_record(inv):
        if is_worker_record(inv) and lease is not None:
            alive = lease.expires_at > holders.now
            return f"alive until {_hms(lease.expires_at)}" if alive else "gone"
        return "-"
    if lease.incarnation == RELEASED:
        return f"{lease.owner}, released"
    if holders.held(lease):
        if lease.expires_at > holders.now:
            return f"{lease.owner}, held until {_hms(lease.expires_at)}"
        return f"{lease.owner}, held (its worker's heartbeat is current)"
    if lease.expires_at > holders.now:
        return f"{lease.owner}, void (its process is gone)"
    return f"{lease.owner}, expired"


def _lease_json(inv: Invocation, holders: _Holders | None) -> dict[str, Any] | None:
    lease = inv.lease
    if lease is None:
        return None
    held: bool | None = None
    if holders is not None and inv.status is InvocationStatus.PENDING:
        held = holders.held(lease)
    return {
        "owner": lease.owner,
        "incarnation": lease.incarnation,
        "epoch": lease.epoch,
        "expires_at": lease.expires_at,
        "held": held,
    }


def _hms(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


# -- ls ----------------------------------------------------------------------------------


def ls(args: argparse.Namespace) -> int:
    """``runjournal ls``: one line per invocation, newest first."""
    if args.limit < 0:
        raise CommandError(f"--limit must be >= 0 (0: no limit), got {args.limit}", 2)
    status = InvocationStatus(args.status) if args.status else None
    backend = open_journal(args.url)
    try:
        ids = [
            inv_id
            for inv_id in backend.list_invocations(status)
            if args.workers or not inv_id.startswith(WORKER_PREFIX)
        ]
        found = _parallel(backend.get_invocation, ids)
        records = [
            inv
            for inv in found
            if inv is not None
            and (status is None or inv.status is status)
            and (args.workers or not is_worker_record(inv))
            and (args.handler is None or inv.handler == args.handler)
        ]
        records.sort(key=lambda inv: (inv.created_at, inv.id), reverse=True)
        matching = len(records)
        if args.limit:
            records = records[: args.limit]
        steps = _parallel(lambda inv: len(backend.read_entries(inv.id)), records)
        now = time.time()
        holders = _Holders(backend, now)
        if args.json:
            _print_json(
                [
                    {
                        "id": inv.id,
                        "handler": inv.handler,
                        "status": inv.status.value,
                        "steps": count,
                        "created_at": inv.created_at,
                        "updated_at": inv.updated_at,
                        "age_seconds": max(0.0, now - inv.created_at),
                        "lease": _lease_json(inv, holders),
                        "worker_record": is_worker_record(inv),
                    }
                    for inv, count in zip(records, steps, strict=True)
                ]
            )
            return 0
        rows = [
            [
                inv.id,
                inv.handler,
                inv.status.value,
                str(count),
                format_seconds(now - inv.created_at),
                _lease_text(inv, holders),
            ]
            for inv, count in zip(records, steps, strict=True)
        ]
        if not rows:
            print("no invocations" + ("" if status is None else f" with status {status.value}"))
            return 0
        header = ["ID", "HANDLER", "STATUS", "STEPS", "AGE", "LEASE"]
        print("\n".join(_table(header, rows, right={3})))
        if matching > len(records):
            print(f"({len(records)} newest of {matching}; --limit 0 shows all)")
        return 0
    finally:
        backend.close()


# -- show --------------------------------------------------------------------------------


def _decision_text(entry: Entry) -> str:
    try:
        members, chosen = read_decision(entry)
    except JournalCorrupt as exc:
        return f"(unreadable decision: {exc})"
    of = ",".join(f"#{i}" for i in members)
    if entry.kind is EntryKind.WAIT_FIRST:
        return f"winner #{chosen[0]} of {of}"
    return "order " + ",".join(f"#{i}" for i in chosen) + f" of {of}"


def _outcome_text(entry: Entry) -> str:
    if entry.failure is not None:
        return "FAILED " + failure_text(entry.failure)  # in full
    if entry.kind is not EntryKind.RUN:
        return _decision_text(entry)
    return value_text(entry.codec, entry.payload)


def _entry_json(entry: Entry, origin: float) -> dict[str, Any]:
    document: dict[str, Any] = {
        "index": entry.index,
        "kind": entry.kind.value,
        "name": entry.name,
        "attempts": entry.attempts,
        "recorded_at": entry.created_at,
        "recorded_after_seconds": entry.created_at - origin,
        "outcome": value_json(entry.codec, entry.payload),
        "failure": failure_json(entry.failure),
    }
    if entry.kind is not EntryKind.RUN:
        try:
            members, chosen = read_decision(entry)
        except JournalCorrupt:
            pass
        else:
            document["members"] = members
            document["winner" if entry.kind is EntryKind.WAIT_FIRST else "order"] = (
                chosen[0] if entry.kind is EntryKind.WAIT_FIRST else chosen
            )
    return document


def _timeline_width() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size().columns
    except (OSError, ValueError):
        columns = 100
    return max(20, min(80, columns - 50))


def show(args: argparse.Namespace) -> int:
    """``runjournal show ID``: the invocation, each entry, and a timeline."""
    backend = open_journal(args.url)
    try:
        inv = backend.get_invocation(args.id)
        if inv is None:
            raise CommandError(f"no invocation {args.id!r} in {args.url}")
        entries = backend.read_entries(inv.id)
        holders = _Holders(backend, time.time())
        drawn = bars(inv, entries)
        span = span_of(inv, drawn)
        if args.json:
            _print_json(
                {
                    "invocation": {
                        "id": inv.id,
                        "handler": inv.handler,
                        "status": inv.status.value,
                        "codec": inv.codec,
                        "input": value_json(inv.codec, inv.input),
                        "output": value_json(inv.codec, inv.output),
                        "failure": failure_json(inv.failure),
                        "created_at": inv.created_at,
                        "updated_at": inv.updated_at,
                        "version": inv.version,
                        "lease": _lease_json(inv, holders),
                        "worker_record": is_worker_record(inv),
                    },
                    "entries": [_entry_json(entry, inv.created_at) for entry in entries],
                    "unfinished_steps": [
                        {
                            "index": step.index,
                            "attempts": step.attempts,
                            "first_started_at": step.first_started_at,
                            "in_flight": step.in_flight,
                            "last_error": failure_json(step.last_error),
                        }
                        for step in inv.steps
                    ],
                    "timeline": {"span_seconds": span, "bars": [b.as_json() for b in drawn]},
                }
            )
            return 0
        for line in _show_lines(inv, entries, holders, drawn, span):
            print(line)
        return 0
    finally:
        backend.close()


def _show_lines(
    inv: Invocation,
    entries: list[Entry],
    holders: _Holders,
    drawn: list[Bar],
    span: float,
) -> list[str]:
    now = time.time()
    finished = inv.status is not InvocationStatus.PENDING
    lines = [
        f"invocation  {inv.id}",
        f"handler     {inv.handler}",
        f"status      {inv.status.value}",
        f"created     {format_clock(inv.created_at)} ({format_seconds(now - inv.created_at)} ago)",
        f"{'finished' if finished else 'last write':<11} {format_clock(inv.updated_at)} "
        f"(+{format_seconds(inv.updated_at - inv.created_at)})",
        f"input       {value_text(inv.codec, inv.input, limit=100)}",
    ]
    if inv.status is InvocationStatus.COMPLETED:
        lines.append(f"output      {value_text(inv.codec, inv.output, limit=100)}")
    if inv.failure is not None:
        lines.append(f"failure     {failure_text(inv.failure)}")
    if inv.lease is not None and not finished:
        lines.append(f"lease       {_lease_text(inv, holders)}, epoch {inv.lease.epoch}")
    lines.append(f"version     {inv.version}")
    lines.append("")
    if not entries:
        lines.append("no steps journaled")
    else:
        rows = [
            [
                str(e.index),
                e.kind.value,
                e.name or "-",
                str(e.attempts),
                _recorded(e.created_at, inv.created_at),
                _outcome_text(e),
            ]
            for e in entries
        ]
        header = ["#", "KIND", "NAME", "ATTEMPTS", "RECORDED", "OUTCOME"]
        lines.extend(_table(header, rows, right={0, 3}))
    recorded = {e.index for e in entries}
    open_steps = [step for step in inv.steps if step.index not in recorded]
    if open_steps:
        lines.append("")
        lines.append("steps with no outcome yet")
        for step in open_steps:
            n = step.attempts
            if step.in_flight:
                what = (
                    f"{n} attempt{'s' if n != 1 else ''} without an outcome (attempt {n} "
                    "started and has not ended: it runs, or its worker died)"
                )
            else:
                what = f"{n} failed attempt{'s' if n != 1 else ''}"
            error = failure_text(step.last_error) if step.last_error is not None else "-"
            lines.append(
                f"  #{step.index}: {what}; first started "
                f"+{format_seconds(step.first_started_at - inv.created_at)}; last error: {error}"
            )
    if drawn:
        width = _timeline_width()
        lines.append("")
        lines.append(
            f"timeline: 0 = created {format_clock(inv.created_at)[11:]}, one column = "
            f"{format_seconds(span / width)}; a bar ends when the step was journaled "
            "(see runjournal show --help)"
        )
        lines.extend(render(drawn, span, width=width))
    return lines


def _recorded(at: float, origin: float) -> str:
    return f"{format_clock(at)[11:]} +{format_seconds(at - origin)}"


# -- stats -------------------------------------------------------------------------------


def stats(args: argparse.Namespace) -> int:
    """``runjournal stats``: counts by status, size, oldest pending, workers."""
    backend = open_journal(args.url)
    try:
        now = time.time()
        counts: dict[str, int] = {}
        workers: list[str] = []
        pending_ids: list[str] = []
        for status in InvocationStatus:
            ids = list(backend.list_invocations(status))
            mine = [i for i in ids if not i.startswith(WORKER_PREFIX)]
            workers += [i for i in ids if i.startswith(WORKER_PREFIX)]
            counts[status.value] = len(mine)
            if status is InvocationStatus.PENDING:
                pending_ids = mine
        pending = [inv for inv in _parallel(backend.get_invocation, pending_ids) if inv]
        oldest = min(pending, key=lambda inv: inv.created_at, default=None)
        worker_records = [inv for inv in _parallel(backend.get_invocation, workers) if inv]
        live = sum(
            1 for inv in worker_records if inv.lease is not None and inv.lease.expires_at > now
        )
        size = journal_size(backend)
        url = args.url
        if args.json:
            _print_json(
                {
                    "url": url,
                    "counts": counts,
                    "total": sum(counts.values()),
                    "size_bytes": size,
                    "oldest_pending": None
                    if oldest is None
                    else {
                        "id": oldest.id,
                        "handler": oldest.handler,
                        "created_at": oldest.created_at,
                        "age_seconds": now - oldest.created_at,
                    },
                    "workers": {"records": len(worker_records), "live": live},
                }
            )
            return 0
        print(f"journal    {url}")
        print(f"size       {'-' if size is None else format_bytes(size)}")
        for status_name, count in counts.items():
            line = f"{status_name:<10} {count}"
            if status_name == "pending" and oldest is not None:
                line += (
                    f"  (oldest: {oldest.id}, {oldest.handler}, created "
                    f"{format_seconds(now - oldest.created_at)} ago)"
                )
            print(line)
        print(f"workers    {len(worker_records)} liveness records, {live} live")
        return 0
    finally:
        backend.close()


# -- purge -------------------------------------------------------------------------------


def _statuses(text: str) -> list[InvocationStatus]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    known = [s.value for s in InvocationStatus]
    bad = [name for name in names if name not in known]
    if bad or not names:
        raise CommandError(
            f"--status takes a comma-separated list of {', '.join(known)}; got {text!r}", 2
        )
    return [InvocationStatus(name) for name in names]


def purge(args: argparse.Namespace) -> int:
    """``runjournal purge --older-than 7d``: remove old invocations with their entries."""
    try:
        older_than = parse_duration(args.older_than)
    except ValueError as exc:
        raise CommandError(f"--older-than: {exc}", 2) from None
    statuses = _statuses(args.status)
    if InvocationStatus.PENDING in statuses and not args.include_pending:
        raise CommandError(
            "purging pending invocations takes --include-pending as well: a pending invocation "
            "may still be resumed, and once purged it would start again from scratch",
            2,
        )
    wanted = [s for s in statuses if s is not InvocationStatus.PENDING]
    backend = open_journal(args.url)
    progress = Progress(sys.stderr, "purge (dry run)" if args.dry_run else "purge")
    steps: list[PurgeStep] = []

    def on_step(step: PurgeStep) -> None:
        steps.append(step)
        removed = sum(1 for s in steps if s.removed)
        progress.update(step.done, step.total, f"({removed} {_verb(args.dry_run)})")

    try:
        with Runtime(backend) as rt:
            count = rt.purge(
                older_than=older_than,
                statuses=wanted,
                include_pending=args.include_pending,
                dry_run=args.dry_run,
                progress=on_step,
            )
        if steps:
            progress.finish(len(steps), steps[-1].total, f"({count} {_verb(args.dry_run)})")
    finally:
        backend.close()
    shown = [s.value for s in wanted] + (["pending"] if args.include_pending else [])
    if args.json:
        _print_json(
            {
                "dry_run": args.dry_run,
                "older_than_seconds": older_than,
                "statuses": shown,
                "removed": count,
                "ids": [s.invocation_id for s in steps if s.removed],
                "kept": [
                    {"id": s.invocation_id, "status": s.status.value, "why": s.skipped}
                    for s in steps
                    if not s.removed
                ],
            }
        )
        return 0
    if args.dry_run:
        for step in steps:
            if step.removed:
                print(f"would remove {step.invocation_id} ({step.status.value})")
    for step in steps:
        if not step.removed:
            print(f"kept {step.invocation_id}: {step.skipped}")
    noun = "invocation" if count == 1 else "invocations"
    print(
        f"{'would remove' if args.dry_run else 'removed'} {count} {noun} "
        f"({', '.join(shown)}; older than {args.older_than})"
    )
    return 0


def _verb(dry_run: bool) -> str:
    return "to remove" if dry_run else "removed"


# -- compact -----------------------------------------------------------------------------


def compact(args: argparse.Namespace) -> int:
    """``runjournal compact``: a compacted copy of an LMDB journal, and how to swap it in."""
    url = args.url
    if "://" not in url and os.path.isdir(url):
        url = f"lmdb://{os.path.abspath(url)}"
    path = lmdb_path(url)
    if path is None:
        raise CommandError(
            f"only LMDB journals are compacted ({url}); S3 gives space back as objects are "
            "deleted, e.g. by runjournal purge",
            2,
        )
    source = os.path.abspath(path)
    data = os.path.join(source, "data.mdb")
    if not os.path.isfile(data):
        raise CommandError(f"no journal at {url} ({source} holds no data.mdb)")
    target = os.path.abspath(args.to or source.rstrip(os.sep) + ".compacted")
    if os.path.exists(target):
        raise CommandError(f"{target} exists; remove it or pass --to another new directory", 2)
    try:
        import lmdb
    except ImportError as exc:
        raise CommandError(f"{exc}; pip install 'runjournal[lmdb]'") from exc
    os.makedirs(target, mode=0o700)
    try:
        # A read-only environment of its own: this command opens no journal client,
        # so no second environment of the path exists in this process.
        env = lmdb.open(source, readonly=True, max_dbs=0)
        try:
            env.copy(target, compact=True)
        finally:
            env.close()
    except lmdb.Error as exc:
        raise CommandError(f"compacting {source} failed: {type(exc).__name__}: {exc}") from exc
    before = os.path.getsize(data)
    after = os.path.getsize(os.path.join(target, "data.mdb"))
    if args.json:
        _print_json(
            {
                "source": source,
                "copy": target,
                "size_before": before,
                "size_after": after,
                "swapped": False,
            }
        )
        return 0
    old = source.rstrip(os.sep) + ".old"
    print(f"wrote a compacted copy of {source} to {target}")
    print(f"data.mdb: {format_bytes(before)} -> {format_bytes(after)}")
    print("The journal in use was not touched (it cannot be swapped safely while any process")
    print("may have it open). To switch: stop every worker and service using it, then")
    print(f"  mv {source} {old} && mv {target} {source}")
    print(f"and delete {old} once they run well on the copy.")
    return 0


# -- recover / worker --------------------------------------------------------------------


def _result_json(result: RecoveryResult) -> dict[str, Any]:
    return {
        "id": result.invocation_id,
        "handler": result.handler,
        "status": result.status.value,
        "output": result.output,
        "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}",
        "skipped": result.skipped,
        "running": result.running,
    }


def _result_text(result: RecoveryResult) -> str:
    if result.skipped is not None:
        what = f"skipped: {result.skipped}"
    elif result.running:
        what = "still running (the timeout passed)"
    elif result.error is not None:
        what = f"{result.status.value}: {type(result.error).__name__}: {result.error}"
    else:
        what = result.status.value
    return f"{result.invocation_id}  {result.handler}  {what}"


def recover(args: argparse.Namespace) -> int:
    """``runjournal recover APP``: resume orphaned invocations once; 1 if any stays pending
    with an error."""
    timeout = None
    if args.timeout is not None:
        try:
            timeout = parse_duration(args.timeout)
        except ValueError as exc:
            raise CommandError(f"--timeout: {exc}", 2) from None
    rt = load_runtime(args.app)
    try:
        results = rt.recover(timeout=timeout)
    finally:
        rt.close()
    if args.json:
        _print_json([_result_json(r) for r in results])
    elif not results:
        print("nothing to recover")
    else:
        for result in results:
            print(_result_text(result))
    stuck = [
        r
        for r in results
        if r.status is InvocationStatus.PENDING and r.error is not None and r.skipped is None
    ]
    return 1 if stuck else 0


def worker(args: argparse.Namespace) -> int:
    """``runjournal worker APP``: recover orphans until SIGTERM / SIGINT, then close."""
    interval = None
    if args.interval is not None:
        try:
            interval = parse_duration(args.interval)
        except ValueError as exc:
            raise CommandError(f"--interval: {exc}", 2) from None
        if interval <= 0:
            raise CommandError("--interval must be above 0", 2)
    rt = load_runtime(args.app)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if received:  # a second signal: the user does not want to wait
            os.write(2, b"runjournal worker: second signal, exiting without waiting\n")
            os._exit(130)
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rt.start_recovery(interval)
        every = rt.lease / 3 if interval is None else interval
        print(
            f"runjournal worker: {rt.worker_id} recovers orphaned invocations of {args.app} "
            f"every {format_seconds(every)}; SIGTERM or Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(
            f"runjournal worker: {received[0]}: stopping (running steps finish, leases are "
            "released)",
            flush=True,
        )
        rt.close()
        print("runjournal worker: stopped cleanly", flush=True)
        return 0
    finally:
        rt.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
