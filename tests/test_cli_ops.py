"""The operating commands (ls, show, stats, purge, compact, recover, worker), as an operator
runs them: the installed ``runjournal`` command in subprocesses, on real LMDB journals and
on the session's moto S3 server."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from runjournal.backends import open_backend
from runjournal.context import Context, Runtime, TerminalError
from runjournal.context._lease import WORKER_HANDLER, worker_record_id
from runjournal.journal import (
    Entry,
    EntryKind,
    Failure,
    Invocation,
    InvocationStatus,
    JournalBackend,
    JSONCodec,
    Lease,
    StepProgress,
)

pytest.importorskip("lmdb")

RUNJOURNAL = str(Path(sys.executable).parent / "runjournal")
JSON = JSONCodec()

# The application the recover and worker commands load (APP = app:rt).
APP = textwrap.dedent(
    """
    from runjournal import Context, Runtime

    rt = Runtime(lease=2.0)  # $RUNJOURNAL_URL

    @rt.handler("orders.pay")
    def pay(ctx: Context, order: dict) -> str:
        ctx.run(lambda: "reserved", name="reserve")
        return ctx.run(lambda: f"PAID-{order['id']}", name="pay")
    """
)


def cli(
    *args: str, url: str | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("RUNJOURNAL_URL", None)
    if url is not None:
        env["RUNJOURNAL_URL"] = url
    env["COLUMNS"] = "110"
    return subprocess.run(
        [RUNJOURNAL, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert done.returncode == code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- a journal with retries, futures and a terminal failure ----------------------------


def _shop(backend: JournalBackend) -> Runtime:
    rt = Runtime(backend)
    tries: dict[str, int] = {}

    def flaky(key: str) -> str:
        tries[key] = tries.get(key, 0) + 1
        time.sleep(0.02)
        if tries[key] < 3:
            raise ConnectionError("shipping API timed out")
        return f"TRK-{key}"

    def sleepy(seconds: float, value: Any) -> Any:
        time.sleep(seconds)
        return value

    def decline() -> None:
        time.sleep(0.03)
        raise TerminalError("card declined: insufficient funds (code 51)")

    @rt.handler("orders.process")
    def process(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        ctx.run_void(lambda: time.sleep(0.01), name="log-analytics")
        tracking = ctx.run(
            lambda: flaky(str(order["id"])),
            name="schedule-shipment",
            max_retry_attempts=5,
            initial_retry_interval=0.02,
        )
        crm = ctx.run_async(lambda: sleepy(0.12, "crm-ok"), name="crm")
        mail = ctx.run_async(lambda: sleepy(0.05, {"sent": True}), name="email")
        first = ctx.wait_first(crm, mail)
        for fut in ctx.wait(crm, mail):
            fut.result()
        if order.get("declined"):
            ctx.run(decline, name="charge")
        return {"tracking": tracking, "first": first.result()}

    return rt


def _orphan(backend: JournalBackend, inv_id: str, *, order: int = 7) -> None:
    """A pending orders.pay invocation whose worker died mid-retry: its lease expired."""
    now = time.time()
    backend.create_invocation(
        Invocation(
            id=inv_id,
            handler="orders.pay",
            input=JSON.encode({"id": order}),
            codec="json",
            created_at=now - 5,
            updated_at=now - 4,
            lease=Lease("gone-worker", 5, 1, now - 60),
            steps=[
                StepProgress(1, 2, now - 4.5, last_error=Failure("ConnectionError", "down")),
            ],
        )
    )
    backend.append_entry(
        inv_id, Entry(0, EntryKind.RUN, "reserve", b'"reserved"', "json", created_at=now - 4.9)
    )


def _build(backend: JournalBackend) -> None:
    rt = _shop(backend)
    assert rt.invoke("orders.process", {"id": 42}, invocation_id="order-42")["tracking"] == (
        "TRK-42"
    )
    with pytest.raises(TerminalError):
        rt.invoke("orders.process", {"id": 43, "declined": True}, invocation_id="order-43")
    rt.close()
    _orphan(backend, "order-44")
    now = time.time()
    backend.create_invocation(  # a live worker's liveness record: hidden from ls and stats
        Invocation(
            id=worker_record_id("host/1/live"),
            handler=WORKER_HANDLER,
            input=b"",
            codec="json",
            status=InvocationStatus.COMPLETED,
            output=b"null",
            created_at=now,
            updated_at=now,
            lease=Lease("host/1/live", 3, 0, now + 3600),
        )
    )


@pytest.fixture(scope="module")
def shop_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An LMDB journal: order-42 completed, order-43 failed, order-44 an orphan."""
    url = f"lmdb://{tmp_path_factory.mktemp('shop')}/journal"
    backend = open_backend(url)
    _build(backend)
    backend.close()
    return url


# -- help ----------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    out = ok(cli("--help"))
    for command in ("ls", "show", "stats", "purge", "compact", "recover", "worker"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), out
    show_help = ok(cli("show", "--help"))
    assert "a bar ends exactly where the step's outcome was journaled" in " ".join(
        show_help.split()
    )
    for command in ("ls", "show", "stats", "purge", "compact"):
        assert "$RUNJOURNAL_URL" in ok(cli(command, "--help"))


# -- ls --------------------------------------------------------------------------------


def test_ls(shop_url: str) -> None:
    out = ok(cli("ls", url=shop_url))
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "HANDLER", "STATUS", "STEPS", "AGE", "LEASE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["order-43", "order-42", "order-44"]  # newest first
    assert rows["order-42"].split()[1:4] == ["orders.process", "completed", "6"]
    assert rows["order-43"].split()[1:4] == ["orders.process", "failed", "7"]
    assert rows["order-44"].split()[1:4] == ["orders.pay", "pending", "1"]
    assert rows["order-44"].endswith("gone-worker, expired")
    assert "runjournal.worker" not in out  # liveness records are hidden

    listed = json.loads(ok(cli("ls", "--json", "--url", shop_url)))
    by_id = {item["id"]: item for item in listed}
    assert set(by_id) == {"order-42", "order-43", "order-44"}
    assert by_id["order-42"]["steps"] == 6 and by_id["order-42"]["status"] == "completed"
    assert by_id["order-44"]["lease"]["owner"] == "gone-worker"
    assert by_id["order-44"]["lease"]["held"] is False
    assert all(item["age_seconds"] >= 0 and not item["worker_record"] for item in listed)

    failed = json.loads(ok(cli("ls", "--json", "--status", "failed", url=shop_url)))
    assert [item["id"] for item in failed] == ["order-43"]
    pay = json.loads(ok(cli("ls", "--json", "--handler", "orders.pay", url=shop_url)))
    assert [item["id"] for item in pay] == ["order-44"]
    limited = ok(cli("ls", "--limit", "1", url=shop_url)).splitlines()
    assert [line.split()[0] for line in limited[1:-1]] == ["order-43"]
    assert limited[-1] == "(1 newest of 3; --limit 0 shows all)"
    everything = json.loads(ok(cli("ls", "--json", "--workers", url=shop_url)))
    workers = [item for item in everything if item["worker_record"]]
    assert [item["id"] for item in workers] == [worker_record_id("host/1/live")]


# -- show ------------------------------------------------------------------------------

BAR = re.compile(r"^(?P<label>#\d+ .{1,21}?)\s+\|(?P<cells>[ =#X>]+)\|\s(?P<notes>.*)$")


def _bars(out: str) -> dict[str, re.Match[str]]:
    found = {}
    for line in out.splitlines():
        match = BAR.match(line)
        if match:
            found[match["label"].strip()] = match
    return found


def test_show_prints_the_entries_and_a_timeline(shop_url: str) -> None:
    out = ok(cli("show", "order-43", url=shop_url))
    assert re.search(r"^status\s+failed$", out, re.M)
    assert re.search(r"^input\s+\{\"declined\":true,\"id\":43\}$", out, re.M)
    assert "card declined: insufficient funds (code 51)" in out  # the failure, in full
    table = [line for line in out.splitlines() if re.match(r"^\d+\s+(run|wait)", line)]
    assert [line.split()[1:3] for line in table] == [
        ["run", "log-analytics"],
        ["run", "schedule-shipment"],
        ["run", "crm"],
        ["run", "email"],
        ["wait_first", "-"],
        ["wait", "-"],
        ["run", "charge"],
    ]
    assert table[1].split()[3] == "3"  # attempts of the retried step
    assert table[1].endswith('"TRK-43"')
    assert table[4].endswith("winner #3 of #2,#3")
    assert table[5].endswith("order #3,#2 of #2,#3")
    assert "FAILED " in table[6]
    assert table[6].endswith("TerminalError: card declined: insufficient funds (code 51)")

    # The timeline: one bar per step on one axis, each ending where it was journaled.
    bars = _bars(out)
    assert list(bars) == [
        "#0 log-analytics",
        "#1 schedule-shipment",
        "#2 crm",
        "#3 email",
        "#4 wait_first",
        "#5 wait",
        "#6 charge",
    ]
    widths = {len(m["cells"]) for m in bars.values()}
    assert len(widths) == 1  # a shared axis
    ends = {label: m["cells"].rstrip().__len__() - 1 for label, m in bars.items()}
    starts = {label: len(m["cells"]) - len(m["cells"].lstrip()) for label, m in bars.items()}
    for match in bars.values():
        cells = match["cells"].strip()
        assert set(cells[:-1]) <= {"="} and cells[-1] in "#X", match.string
    assert bars["#6 charge"]["cells"].rstrip().endswith("X")
    assert "terminal failure" in bars["#6 charge"]["notes"]
    assert "3 attempts" in bars["#1 schedule-shipment"]["notes"]
    assert "future" in bars["#2 crm"]["notes"] and "future" in bars["#3 email"]["notes"]
    # Futures start together, once the step before them was journaled; the slower
    # one ends later; the wait starts where wait_first ended; charge comes last.
    assert starts["#2 crm"] == starts["#3 email"] >= ends["#1 schedule-shipment"] - 1
    assert ends["#2 crm"] > ends["#3 email"]
    assert starts["#5 wait"] >= ends["#4 wait_first"] - 1
    assert ends["#6 charge"] == max(ends.values())
    assert starts["#1 schedule-shipment"] >= ends["#0 log-analytics"] - 1

    document = json.loads(ok(cli("show", "order-43", "--json", url=shop_url)))
    inv = document["invocation"]
    assert inv["status"] == "failed" and inv["input"]["value"] == {"declined": True, "id": 43}
    assert inv["failure"]["message"] == "card declined: insufficient funds (code 51)"
    entries = document["entries"]
    assert [e["index"] for e in entries] == list(range(7))
    assert entries[1]["attempts"] == 3 and entries[1]["outcome"]["value"] == "TRK-43"
    assert entries[3]["outcome"]["value"] == {"sent": True}
    assert entries[4]["winner"] == 3 and entries[5]["order"] == [3, 2]
    assert entries[6]["failure"]["type"].endswith("TerminalError")
    timeline = document["timeline"]["bars"]
    assert [b["future"] for b in timeline] == [False, False, True, True, False, False, False]
    assert all(
        0 <= b["start"] <= b["end"] <= document["timeline"]["span_seconds"] for b in timeline
    )


def test_show_a_pending_invocation_with_a_step_being_retried(shop_url: str) -> None:
    out = ok(cli("show", "order-44", url=shop_url))
    assert re.search(r"^status\s+pending$", out, re.M)
    assert re.search(r"^lease\s+gone-worker, expired, epoch 1$", out, re.M)
    assert "#1: 2 failed attempts; first started +0.50s; last error: ConnectionError: down" in out
    bars = _bars(out)
    assert list(bars) == ["#0 reserve", "#1 (no outcome yet)"]
    assert bars["#1 (no outcome yet)"]["cells"].rstrip().endswith(">")
    assert "2 attempts so far" in bars["#1 (no outcome yet)"]["notes"]


# -- stats -----------------------------------------------------------------------------


def test_stats(shop_url: str) -> None:
    document = json.loads(ok(cli("stats", "--json", url=shop_url)))
    assert document["counts"] == {"pending": 1, "completed": 1, "failed": 1}
    assert document["oldest_pending"]["id"] == "order-44"
    assert document["workers"] == {"records": 1, "live": 1}
    assert document["size_bytes"] > 0
    out = ok(cli("stats", url=shop_url))
    assert re.search(
        r"^pending\s+1\s+\(oldest: order-44, orders.pay, created \S+ ago\)$", out, re.M
    )
    assert re.search(r"^completed\s+1$", out, re.M)
    assert re.search(r"^size\s+\d+\.\d KB$", out, re.M)


# -- errors ----------------------------------------------------------------------------


def test_errors_are_one_line_and_a_non_zero_exit(shop_url: str, tmp_path: Path) -> None:
    missing = f"lmdb://{tmp_path}/nowhere"
    one_line_error(cli("ls", url=missing), 1, "no journal at", "does not exist")
    assert not (tmp_path / "nowhere").exists()  # looking created nothing
    one_line_error(cli("stats", "--url", missing), 1, "no journal at")
    one_line_error(cli("show", "nope", url=shop_url), 1, "no invocation 'nope'")
    one_line_error(
        cli("purge", "--older-than", "7x", url=shop_url), 2, "bad duration '7x'", "7d, 12h"
    )
    one_line_error(cli("purge", "--older-than", "1d", "--status", "done", url=shop_url), 2)
    one_line_error(
        cli("purge", "--older-than", "1d", "--status", "pending", url=shop_url),
        2,
        "--include-pending",
    )
    one_line_error(cli("recover", "nomodule:rt", cwd=tmp_path), 1, "cannot import 'nomodule'")
    one_line_error(cli("worker", "nocolon", cwd=tmp_path), 2, "module:attribute")
    one_line_error(cli("compact", "--url", "memory://"), 2, "only LMDB journals")
    debug = cli("show", "nope", "--debug", url=shop_url)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_an_unreachable_s3_endpoint_is_one_line(moto: Any) -> None:
    url = "s3://bucket/prefix?endpoint_url=http://127.0.0.1:9"  # nothing listens there
    line = one_line_error(cli("ls", url=url), 1, "Could not connect to the endpoint URL")
    assert line.startswith("runjournal ls: S3 ") and "gave up after 6 attempts" in line


# -- purge and compact -----------------------------------------------------------------


def _aged(backend: JournalBackend, inv_id: str, status: InvocationStatus, days: float) -> None:
    at = time.time() - days * 86400
    backend.create_invocation(
        Invocation(
            id=inv_id,
            handler="t",
            input=b"null",
            codec="json",
            status=status,
            output=b'"x"' if status is InvocationStatus.COMPLETED else None,
            failure=Failure("E", "m") if status is InvocationStatus.FAILED else None,
            created_at=at,
            updated_at=at,
            lease=Lease("gone-worker", 1, 1, at + 30),
        )
    )
    for index in range(20):
        entry = Entry(index, EntryKind.RUN, f"s{index}", b'"' + b"x" * 400 + b'"', "json")
        backend.append_entry(inv_id, entry)


@pytest.fixture
def old_journal(tmp_path: Path) -> str:
    url = f"lmdb://{tmp_path}/journal"
    backend = open_backend(url)
    for i in range(6):
        _aged(backend, f"done-{i}", InvocationStatus.COMPLETED, 10 + i)
    _aged(backend, "failed-old", InvocationStatus.FAILED, 9)
    _aged(backend, "done-new", InvocationStatus.COMPLETED, 1)
    _aged(backend, "pending-old", InvocationStatus.PENDING, 20)
    backend.close()
    return url


def test_purge_removes_exactly_the_matching_invocations(old_journal: str) -> None:
    old = {f"done-{i}" for i in range(6)} | {"failed-old"}
    dry = json.loads(ok(cli("purge", "--older-than", "7d", "--dry-run", "--json", url=old_journal)))
    assert dry["dry_run"] and dry["removed"] == 7 and set(dry["ids"]) == old
    assert len(json.loads(ok(cli("ls", "--json", url=old_journal)))) == 9  # nothing removed

    done = cli("purge", "--older-than", "7d", url=old_journal)
    out = ok(done)
    assert out.splitlines()[-1] == "removed 7 invocations (completed, failed; older than 7d)"
    # Not a terminal: plain progress lines on stderr, the last one complete.
    progress = done.stderr.strip().splitlines()
    assert progress and all(re.fullmatch(r"purge: \d+/7 \(\d+ removed\)", p) for p in progress)
    assert progress[-1] == "purge: 7/7 (7 removed)"
    left = {item["id"] for item in json.loads(ok(cli("ls", "--json", url=old_journal)))}
    assert left == {"done-new", "pending-old"}

    # Pending ones only with the second switch (its worker is gone).
    kept = json.loads(ok(cli("purge", "--older-than", "7d", "--json", url=old_journal)))
    assert kept["removed"] == 0
    purged = json.loads(
        ok(cli("purge", "--older-than", "7d", "--include-pending", "--json", url=old_journal))
    )
    assert purged["ids"] == ["pending-old"] and purged["statuses"] == [
        "completed",
        "failed",
        "pending",
    ]
    backend = open_backend(old_journal)
    assert set(backend.list_invocations()) == {"done-new"}
    assert backend.read_entries("done-0") == [] and backend.read_entries("pending-old") == []
    assert len(backend.read_entries("done-new")) == 20
    backend.close()


def test_purge_keeps_a_pending_invocation_a_live_worker_holds(tmp_path: Path) -> None:
    url = f"lmdb://{tmp_path}/journal"
    backend = open_backend(url)
    _aged(backend, "running", InvocationStatus.PENDING, 20)
    stored = backend.get_invocation("running")
    assert stored is not None
    import attrs

    backend.update_invocation(
        attrs.evolve(stored, lease=Lease("other-host/1/x", 4, 2, time.time() + 600))
    )
    backend.close()
    done = cli("purge", "--older-than", "1d", "--include-pending", url=url)
    lines = ok(done).splitlines()
    assert lines[0] == "kept running: worker 'other-host/1/x' holds its lease (it may be running)"
    assert lines[-1] == "removed 0 invocations (completed, failed, pending; older than 1d)"


def test_purge_draws_a_progress_bar_on_a_terminal(old_journal: str) -> None:
    leader, follower = pty.openpty()
    env = {**os.environ, "RUNJOURNAL_URL": old_journal}
    child = subprocess.Popen(
        [RUNJOURNAL, "purge", "--older-than", "7d"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
        text=True,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif child.poll() is not None:
            break
    os.close(leader)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    assert b"\rpurge [" in seen and b"] 7/7 (7 removed)" in seen
    assert b"#" * 30 in seen  # the full bar
    assert out.splitlines()[-1].startswith("removed 7 invocations")


def test_compact_writes_a_smaller_copy_with_the_same_invocations(
    old_journal: str, tmp_path: Path
) -> None:
    ok(cli("purge", "--older-than", "7d", url=old_journal))
    target = tmp_path / "copy"
    document = json.loads(ok(cli("compact", "--to", str(target), "--json", url=old_journal)))
    assert document["copy"] == str(target) and document["swapped"] is False
    assert document["size_after"] < document["size_before"]
    before = json.loads(ok(cli("ls", "--json", url=old_journal)))
    after = json.loads(ok(cli("ls", "--json", "--url", f"lmdb://{target}")))
    assert [(i["id"], i["steps"]) for i in after] == [(i["id"], i["steps"]) for i in before]
    text = ok(cli("compact", url=old_journal))
    path = old_journal.removeprefix("lmdb://")
    assert f"wrote a compacted copy of {path} to {path}.compacted" in text
    assert f"mv {path} {path}.old && mv {path}.compacted {path}" in text
    one_line_error(cli("compact", url=old_journal), 2, "exists")


# -- recover and worker ------------------------------------------------------------------


def test_recover_runs_orphans_once(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    url = f"lmdb://{tmp_path}/journal"
    backend = open_backend(url)
    _orphan(backend, "order-7")
    backend.close()
    results = json.loads(ok(cli("recover", "app:rt", "--json", url=url, cwd=tmp_path)))
    assert results == [
        {
            "id": "order-7",
            "handler": "orders.pay",
            "status": "completed",
            "output": "PAID-7",
            "error": None,
            "skipped": None,
            "running": False,
        }
    ]
    assert ok(cli("recover", "app:rt", url=url, cwd=tmp_path)).strip() == "nothing to recover"


def test_worker_completes_an_orphan_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    url = f"lmdb://{tmp_path}/journal"
    env = {**os.environ, "RUNJOURNAL_URL": url}
    worker = subprocess.Popen(
        [RUNJOURNAL, "worker", "app:rt", "--interval", "0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        banner = worker.stdout.readline()
        assert "recovers orphaned invocations of app:rt every 0.10s" in banner
        backend = open_backend(url)
        _orphan(backend, "order-8", order=8)  # appears while the worker runs
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stored = backend.get_invocation("order-8")
            assert stored is not None
            if stored.status is InvocationStatus.COMPLETED:
                break
            time.sleep(0.05)
        assert stored.status is InvocationStatus.COMPLETED
        assert stored.output is not None and JSON.decode(stored.output) == "PAID-8"
        backend.close()
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    assert out.splitlines() == [
        "runjournal worker: SIGTERM: stopping (running steps finish, leases are released)",
        "runjournal worker: stopped cleanly",
    ]
    assert "Traceback" not in err


# -- S3 --------------------------------------------------------------------------------


def test_every_journal_command_on_s3(moto: Any, bucket: str) -> None:
    from runjournal.backends.s3 import S3Backend

    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    backend = S3Backend(moto.client(), bucket, prefix, owns_client=True)
    _build(backend)
    _aged(backend, "ancient", InvocationStatus.COMPLETED, 30)
    backend.close()
    url = f"s3://{bucket}/{prefix}?endpoint_url={moto.endpoint_url}"

    listed = json.loads(ok(cli("ls", "--json", url=url)))
    assert [item["id"] for item in listed] == ["order-43", "order-42", "order-44", "ancient"]
    assert [item["steps"] for item in listed] == [7, 6, 1, 20]
    shown = json.loads(ok(cli("show", "order-42", "--json", url=url)))
    assert shown["invocation"]["output"]["value"] == {"first": {"sent": True}, "tracking": "TRK-42"}
    assert len(shown["timeline"]["bars"]) == 6
    assert "#1 schedule-shipment" in ok(cli("show", "order-42", url=url))
    stats = json.loads(ok(cli("stats", "--json", url=url)))
    assert stats["counts"] == {"pending": 1, "completed": 2, "failed": 1}
    assert stats["size_bytes"] > 0
    purged = json.loads(ok(cli("purge", "--older-than", "7d", "--json", url=url)))
    assert purged["ids"] == ["ancient"]
    one_line_error(cli("show", "ancient", url=url), 1, "no invocation 'ancient'")
