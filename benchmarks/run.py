"""Run the benchmark suite and print each figure as a ratio to the raw LMDB
commit rate measured in the same run, on the same directory.

    python -m benchmarks [--engines memory,lmdb,s3] [--dir DIR] [--repeat N] [--json FILE]

Exit status 1 when a target of issue 3 is missed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._workloads import (
    Opener,
    raw_fsync,
    raw_lmdb_commits,
    w1_async,
    w1_at_most_once,
    w1_sequential,
    w2_async,
    w2_concurrent,
    w3_replay,
)
from runjournal.backends import MemoryBackend
from runjournal.backends.lmdb import LMDBBackend
from runjournal.context import set_testing

WORKLOADS: dict[str, Callable[[Opener], float]] = {
    "W1": w1_sequential,
    "W1-amo": w1_at_most_once,  # W1 with at_most_once=True (a start marker per step)
    "W2": w2_concurrent,
    "W3": w3_replay,
    "W1-async": w1_async,
    "W2-async": w2_async,
}

# (engine, workload) -> (minimum, "x raw" if the target is a ratio, else "steps/s")
TARGETS: dict[tuple[str, str], tuple[float, str]] = {
    ("lmdb", "W1"): (0.8, "x raw"),
    ("lmdb", "W2"): (4.0, "x raw"),
    ("lmdb", "W3"): (200_000, "steps/s"),
    ("lmdb", "W2-async"): (8.0, "x raw"),
    ("memory", "W1"): (50_000, "steps/s"),
}


Fresh = Callable[[], Opener]
Extras = Callable[[], dict[str, float]] | None


@contextmanager
def _memory(_: Path) -> Iterator[tuple[Fresh, Extras]]:
    yield (lambda: MemoryBackend), None


@contextmanager
def _lmdb(workdir: Path) -> Iterator[tuple[Fresh, Extras]]:
    counter = itertools.count()

    def fresh() -> Opener:
        path = workdir / f"lmdb-{next(counter)}"
        return lambda: LMDBBackend.open(path)

    yield fresh, None


@contextmanager
def _s3(workdir: Path) -> Iterator[tuple[Fresh, Extras]]:
    from benchmarks.s3 import measure_requests, s3_engine

    with s3_engine(workdir) as (opener, counter):
        # Each call of the opener is a fresh journal (prefix) on the moto server.
        yield (lambda: opener), (lambda: measure_requests(opener, counter))


ENGINES: dict[str, Callable[[Path], Any]] = {"memory": _memory, "lmdb": _lmdb, "s3": _s3}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure(engines: list[str], workdir: Path, repeat: int) -> dict[str, Any]:
    """Measure every workload on every engine, each run paired with a raw LMDB
    commit measurement taken just before it on the same directory.

    The disk's sync rate drifts by 10-20% within seconds on shared machines,
    so each ratio is taken within its pair; the report gives medians.
    """
    set_testing(True)  # no retries are expected; never sleep if one happens
    raw_commits: list[float] = []
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "directory": str(workdir),
        "repeat": repeat,
        "raw": {"fsync_ops_per_s": _median([raw_fsync(workdir, 500) for _ in range(repeat)])},
        "engines": {},
    }
    for engine in engines:
        figures: dict[str, Any] = {}
        with ENGINES[engine](workdir) as (fresh, extras):
            for name, workload in WORKLOADS.items():
                rates, ratios = [], []
                for _ in range(repeat):
                    raw = raw_lmdb_commits(workdir, 300)
                    rate = workload(fresh())
                    raw_commits.append(raw)
                    rates.append(rate)
                    ratios.append(rate / raw)
                figures[name] = {"steps_per_s": _median(rates), "x_raw_lmdb": _median(ratios)}
            if extras is not None:
                results.setdefault("requests", {})[engine] = extras()
        results["engines"][engine] = figures
    results["raw"]["lmdb_commits_per_s"] = _median(raw_commits)
    return results


def report(results: dict[str, Any]) -> tuple[str, bool]:
    """The table to print, and whether every target was met."""
    raw = results["raw"]
    lines = [
        f"directory: {results['directory']} (python {results['python']}); "
        f"medians of {results['repeat']} runs",
        f"raw fsync (100-byte append + fsync): {raw['fsync_ops_per_s']:>10,.0f} ops/s",
        f"raw LMDB (one put per sync commit):  {raw['lmdb_commits_per_s']:>10,.0f} commits/s",
        "",
        f"{'engine':<8} {'workload':<9} {'steps/s':>12} {'x raw LMDB':>11}  target",
    ]
    ok = True
    for engine, figures in results["engines"].items():
        for workload, figure in figures.items():
            rate, ratio = figure["steps_per_s"], figure["x_raw_lmdb"]
            target = TARGETS.get((engine, workload))
            verdict = ""
            if target is not None:
                minimum, unit = target
                met = (ratio if unit == "x raw" else rate) >= minimum
                ok &= met
                verdict = f">= {minimum:,g} {unit}: {'met' if met else 'MISSED'}"
            lines.append(f"{engine:<8} {workload:<9} {rate:>12,.0f} {ratio:>10.2f}x  {verdict}")
    lines.append("(x raw LMDB: each run against a raw LMDB measurement taken just before it)")
    for engine, figures in results["engines"].items():
        for this, base, what in (
            ("W1-amo", "W1", "W1 with at_most_once"),
            ("W1-async", "W1", "W1-async"),
            ("W2-async", "W2", "W2-async"),
        ):
            if this in figures and base in figures:
                share = figures[this]["x_raw_lmdb"] / figures[base]["x_raw_lmdb"]
                lines.append(f"{engine}: {what} runs at {share:.2f}x {base}")
    for engine, counts in results.get("requests", {}).items():
        lines.append(f"{engine} requests: " + ", ".join(f"{k}={v:g}" for k, v in counts.items()))
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--engines", default="memory,lmdb", help="comma-separated engine names")
    parser.add_argument("--dir", type=Path, help="where to put the journals (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; medians count")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}; known: {', '.join(ENGINES)}")
    workdir = Path(tempfile.mkdtemp(prefix="runjournal-bench-", dir=args.dir))
    try:
        started = time.perf_counter()
        results = measure(engines, workdir, args.repeat)
        results["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table, ok = report(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures written to {args.json}", file=sys.stderr)
    return 0 if ok else 1
