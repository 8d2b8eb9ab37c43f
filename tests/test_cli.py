"""The ``runjournal`` command, as a newcomer runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_crashes_a_process_and_ships_exactly_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runjournal", "demo", "--journal", f"lmdb://{tmp_path}/j"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "process 1 died (exit status 1)" in out
    assert out.count("analytics: order 42 received") == 1  # not replayed by process 2
    assert "#1 schedule-shipment  attempts=3" in out
    assert "shipments really scheduled: 1 (exactly once); order-42 is completed" in out


def test_demo_refuses_a_journal_that_already_has_the_order(tmp_path: Path) -> None:
    url = f"lmdb://{tmp_path}/j"
    command = [sys.executable, "-m", "runjournal", "demo", "--journal", url]
    assert subprocess.run(command, cwd=ROOT, capture_output=True, check=False).returncode == 0
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert "already holds order-42; give the demo a new journal" in again.stdout
