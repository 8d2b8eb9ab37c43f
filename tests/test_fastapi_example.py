"""The FastAPI example (examples/fastapi_orders.py) as a real service, killed mid-load.

The example runs under uvicorn in a child process on an LMDB journal and a ledger
file (each external side effect of an order appends one line ``<step> <order id>``
to it). The test sends 200 concurrent orders, SIGKILLs the server once some have
been answered and the rest are in flight, looks at what the dead server left (the
ledger and the journal), restarts it on the same files and checks that:

- its lifespan recovers the orders the dead server left half-done, with no client
  asking (they are polled with GET);
- clients retrying the orders that got no answer get each order's outcome, and a
  retry of an answered order gets the same answer and does nothing again;
- every order completed, and every answer (POST or GET) is the journaled output;
- the ledger: every step of every order happened, and happened once, except a step
  whose closure was *in flight at the kill*: its side effect is in the ledger but
  its outcome was not in the journal when the process died. Such a step runs again
  on resume (steps are recorded once, executed at least once), so it may be in the
  ledger twice, and never more. A step journaled before the kill never runs again.
  A twice-run charge carried the same idempotency key both times: a payment API
  deduplicating by key charges once.

Both ways a restarted server finds its orphans are run: under the same chosen
``RUNJOURNAL_WORKER_ID`` (it takes its invocations back at once), and under the
default ``host/pid/random`` id (the dead pid is seen to be gone at once). Either
way nothing waits for the 30 s lease.

At the end, two things the example ran into in runjournal, checked in isolation:
``AsyncContext.run`` / ``run_async`` typed by their closures under ``mypy --strict``,
and ``ainvoke`` attached to a running invocation holding no thread while it waits.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runjournal import AsyncContext, InvocationStatus, MemoryBackend, Runtime, open_backend
from runjournal.context import is_worker_record
from runjournal.journal import EntryKind, JSONCodec, decode_value

ROOT = Path(__file__).resolve().parent.parent
ORDERS = 200
#: The kill comes once this many orders are answered and at least KILL_BUSY others
#: are half-done (a side effect in the ledger, no answer yet).
KILL_AFTER = 50
KILL_BUSY = 20
#: Over how long (seconds) the first requests are sent.
ARRIVALS = 0.5
STEPS = ("reserve-stock", "charge-card", "schedule-shipment", "issue-invoice", "send-confirmation")
#: The longest any one wait of the test lasts.
LIMIT = 20.0

Order = tuple[str, str]  # (step, order id)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _body(order_id: str) -> dict[str, Any]:
    return {
        "sku": f"sku-{int(order_id) % 7}",
        "quantity": 1 + int(order_id) % 3,
        "amount_cents": 100 * int(order_id),
        "email": f"buyer{order_id}@example.com",
    }


class Server:
    """The example under uvicorn, in a child process; one at a time."""

    def __init__(self, tmp_path: Path, worker_id: str | None) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.journal = tmp_path / "journal"
        self.ledger = tmp_path / "ledger.txt"
        self.log = tmp_path / "server.log"
        self.env = dict(os.environ)
        self.env.update(
            RUNJOURNAL_URL=f"lmdb://{self.journal}",  # an absolute path: lmdb:///tmp/...
            ORDERS_LEDGER=str(self.ledger),
            PYTHONUNBUFFERED="1",
        )
        self.env.pop("RUNJOURNAL_WORKER_ID", None)
        if worker_id is not None:
            self.env["RUNJOURNAL_WORKER_ID"] = worker_id
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "examples.fastapi_orders:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--no-access-log",
                ],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + LIMIT
        while True:  # uvicorn listens once the lifespan's start-up is done
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                answer = httpx.get(f"{self.base}/orders/none", timeout=1.0)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within {LIMIT} s:\n{self.tail()}")
                time.sleep(0.05)
                continue
            assert answer.status_code == 404, answer.text
            return

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, no lease handed back, nothing flushed."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=LIMIT)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM: uvicorn runs the lifespan's shutdown (rt.aclose()), then exits
        (by the signal again: uvicorn re-raises it once it has shut down)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=LIMIT)
        self.proc = None
        assert code in (0, -signal.SIGTERM), (code, self.tail())
        assert "Application shutdown complete" in self.tail(), self.tail()

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=LIMIT)
            self.proc = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def ledger_lines(self) -> list[list[str]]:
        if not self.ledger.exists():
            return []
        return [line.split() for line in self.ledger.read_text().splitlines()]

    def journal_state(self) -> dict[str, tuple[InvocationStatus, set[str], Any]]:
        """Per order id: its status, the names of its journaled steps, its output."""
        backend = open_backend(f"lmdb://{self.journal}")
        try:
            state = {}
            for status in InvocationStatus:
                for inv_id in backend.list_invocations(status):
                    stored = backend.get_invocation(inv_id)
                    if stored is None or is_worker_record(stored):
                        continue
                    assert inv_id.startswith("order-"), inv_id
                    names = {
                        entry.name
                        for entry in backend.read_entries(inv_id)
                        if entry.kind is EntryKind.RUN and entry.name is not None
                    }
                    output = None
                    if stored.output is not None:
                        output = decode_value(JSONCodec(), stored.output, inv_id)
                    state[inv_id.removeprefix("order-")] = (stored.status, names, output)
            return state
        finally:
            backend.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(worker_id: str | None) -> Server:
        server = Server(tmp_path, worker_id)
        servers.append(server)
        return server

    yield make
    for server in servers:  # whatever happened: no child outlives the test
        server.cleanup()


def _client(server: Server) -> Any:
    # No keep-alive: a pooled connection idle for uvicorn's keep-alive timeout (5 s)
    # can be closed by the server just as the client reuses it, which fails that
    # request ("Server disconnected without sending a response") for no reason of ours.
    return httpx.AsyncClient(
        base_url=server.base,
        limits=httpx.Limits(max_connections=ORDERS + 20, max_keepalive_connections=0),
        timeout=httpx.Timeout(LIMIT),
    )


async def _load_and_kill(
    server: Server, order_ids: list[str]
) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """POST every order at once; SIGKILL the server mid-load (see KILL_AFTER).

    Returns the answered orders' bodies and the others' client errors.
    """
    async with _client(server) as client:

        async def post(oid: str) -> Any:
            # Clients arrive over half a second, so the kill finds orders at every step.
            await asyncio.sleep(random.Random(oid).uniform(0, ARRIVALS))
            return await client.post(f"/orders/{oid}", json=_body(oid))

        tasks = {oid: asyncio.create_task(post(oid)) for oid in order_ids}
        deadline = time.monotonic() + LIMIT
        while True:
            answers = sum(task.done() for task in tasks.values())
            if answers >= KILL_AFTER:
                # Orders with a side effect done and no answer yet: half-done ones.
                started = {oid for _, oid, *_ in server.ledger_lines()}
                busy = sum(not tasks[oid].done() for oid in started)
                if busy >= KILL_BUSY:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{answers} answers in {LIMIT} s, {KILL_BUSY} half-done orders never")
            await asyncio.sleep(0.01)
        server.kill()
        await asyncio.wait(tasks.values(), timeout=LIMIT)
    answered: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    for oid, task in tasks.items():
        assert task.done(), f"order {oid}: its request outlived the server by {LIMIT} s"
        exc = task.exception()
        if exc is not None:
            assert isinstance(exc, httpx.TransportError), repr(exc)
            errors[oid] = exc
            continue
        answer = task.result()
        assert answer.status_code == 200, (oid, answer.status_code, answer.text)
        answered[oid] = answer.json()
    return answered, errors


async def _after_restart(
    server: Server, unanswered: list[str], orphans: list[str], again: list[str]
) -> tuple[list[tuple[str, Any]], dict[str, Any], float]:
    """Clients retry the unanswered orders (half at once; the other half once the
    orphans among them are seen completed by GET, i.e. recovered by the lifespan),
    and re-send some answered ones. Returns the POST answers, the GET answers of
    every order, and how long the recovery of the untouched orphans took."""
    async with _client(server) as client:

        async def post(oid: str) -> tuple[str, Any]:
            answer = await client.post(f"/orders/{oid}", json=_body(oid))
            assert answer.status_code == 200, (oid, answer.status_code, answer.text)
            return oid, answer.json()

        async def recovered(oid: str) -> None:
            while True:
                answer = await client.get(f"/orders/{oid}")
                assert answer.status_code == 200, (oid, answer.status_code, answer.text)
                if answer.json()["status"] == "completed":
                    return
                await asyncio.sleep(0.05)

        first = unanswered[0::2]
        later = unanswered[1::2]
        untouched = [oid for oid in orphans if oid in later]
        started = time.monotonic()

        async def wait_recovery() -> float:
            await asyncio.gather(*(recovered(oid) for oid in untouched))
            return time.monotonic() - started

        # The first half is retried twice at once (a client whose first retry timed
        # out on its side sends another): the second waits for the first's outcome.
        retried, recovery = await asyncio.wait_for(
            asyncio.gather(
                asyncio.gather(*(post(oid) for oid in first + first + again)), wait_recovery()
            ),
            timeout=LIMIT,
        )
        retried += await asyncio.wait_for(
            asyncio.gather(*(post(oid) for oid in later)), timeout=LIMIT
        )
        gets = await asyncio.wait_for(
            asyncio.gather(*(client.get(f"/orders/{oid}") for oid in sorted(_all_ids()))),
            timeout=LIMIT,
        )
    views = {}
    for answer in gets:
        assert answer.status_code == 200, answer.text
        views[answer.json()["order_id"]] = answer.json()
    return list(retried), views, recovery


def _all_ids() -> list[str]:
    return [str(n) for n in range(1, ORDERS + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("worker_id", ["orders-web-1", None], ids=["chosen-id", "default-id"])
def test_orders_survive_sigkill_mid_load(make_server: Any, worker_id: str | None) -> None:
    began = time.monotonic()
    server: Server = make_server(worker_id)
    order_ids = _all_ids()
    server.start()

    # -- load, then SIGKILL with requests in flight -----------------------------------
    answered, errors = asyncio.run(_load_and_kill(server, order_ids))
    killed_at = time.monotonic()
    unanswered = sorted(errors, key=int)
    assert len(answered) >= KILL_AFTER
    assert unanswered, "every order was answered before the kill: nothing was in flight"

    # -- what the dead server left behind ---------------------------------------------
    ledger_at_kill = collections.Counter((step, oid) for step, oid, *_ in server.ledger_lines())
    at_kill = server.journal_state()
    journaled_at_kill = {(step, oid) for oid, (_, names, _) in at_kill.items() for step in names}
    orphans = sorted(
        (oid for oid, (status, _, _) in at_kill.items() if status is InvocationStatus.PENDING),
        key=int,
    )
    # A step's effect happens before its outcome is journaled, never after.
    assert journaled_at_kill <= set(ledger_at_kill)
    assert max(ledger_at_kill.values()) == 1, "a step ran twice before any crash"
    # Effects whose outcome the journal did not have: closures in flight at the kill.
    in_flight = set(ledger_at_kill) - journaled_at_kill
    for oid in answered:
        assert at_kill[oid][0] is InvocationStatus.COMPLETED
    assert orphans, "no order was half-done at the kill: nothing to recover"
    assert set(orphans) <= set(unanswered)

    # -- restart on the same journal and ledger -----------------------------------------
    server.start()
    restarted_at = time.monotonic()
    again = sorted(answered, key=int)[:10]
    retried, views, recovery = asyncio.run(_after_restart(server, unanswered, orphans, again))
    server.stop()  # the lifespan's shutdown (aclose) runs and goes well
    finished_at = time.monotonic()

    # -- every order completed, and every answer is the journaled output ----------------
    final = server.journal_state()
    assert "Traceback" not in server.tail(), server.tail()
    assert sorted(final, key=int) == order_ids
    outputs = {}
    for oid in order_ids:
        status, names, output = final[oid]
        assert status is InvocationStatus.COMPLETED, (oid, status)
        assert names == set(STEPS), (oid, names)
        assert output["order_id"] == oid and output["status"] == "confirmed"
        assert output["reservation"] == f"RES-{oid}" and output["tracking"] == f"TRK-{oid}"
        outputs[oid] = output
        assert views[oid] == {"order_id": oid, "status": "completed", "output": output}
    for oid, body in answered.items():
        assert body == outputs[oid], oid
    assert {oid for oid, _ in retried} == {*unanswered, *again}
    assert len(retried) == len(unanswered) + len(unanswered[0::2]) + len(again)
    for oid, body in retried:
        assert body == outputs[oid], oid

    # -- the ledger: once, except closures in flight at the kill (at most twice) ---------
    lines = server.ledger_lines()
    counts = collections.Counter((step, oid) for step, oid, *_ in lines)
    assert set(counts) == {(step, oid) for step in STEPS for oid in order_ids}
    twice = {key for key, n in counts.items() if n > 1}
    assert all(counts[key] == 2 for key in twice), {k: counts[k] for k in twice}
    # Ran twice <=> its first run was in flight at the kill (effect done, outcome not
    # journaled): the journal cannot know the effect happened, so the resume runs it
    # again (the step is not at_most_once), once.
    assert twice == in_flight, (sorted(twice - in_flight), sorted(in_flight - twice))
    for key in journaled_at_kill:
        assert counts[key] == 1, f"{key} was journaled before the kill, yet ran again"
    # A charge carries its idempotency key: the same on both runs, and the one the
    # journaled output names.
    keys = collections.defaultdict(set)
    for step, oid, *details in lines:
        if step == "charge-card":
            keys[oid].add(details[0])
    for oid in order_ids:
        [key] = keys[oid]
        assert outputs[oid]["charge"] == f"CH-{key[3:15]}"

    print(
        f"\n[{worker_id or 'default id'}] {len(answered)} answered before the kill, "
        f"{len(unanswered)} unanswered ({len(orphans)} half-done, "
        f"{len(unanswered) - len(at_kill.keys() & set(unanswered))} not yet started); "
        f"{len(in_flight)} step closures in flight at the kill, {len(twice)} ran twice "
        f"{dict(collections.Counter(step for step, _ in twice))}; "
        f"load {killed_at - began:.2f} s, "
        f"untouched orphans recovered {recovery:.2f} s after restart, "
        f"restart to the end {finished_at - restarted_at:.2f} s, "
        f"total {finished_at - began:.2f} s"
    )


# -- what the example found in runjournal (each failed before its fix) -----------------


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_async_context_steps_are_typed_by_their_closures(tmp_path: Path) -> None:
    """``await ctx.run(fn)`` / ``ctx.run_async(fn)`` have the type of ``fn``'s result,
    for coroutine closures as for plain ones, under ``mypy --strict`` (the example
    is type-checked, and copies of it will be)."""
    snippet = tmp_path / "typed_handler.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from typing_extensions import assert_type

            from runjournal import AsyncContext, AsyncRunFuture


            async def handler(ctx: AsyncContext, order: dict[str, str]) -> str:
                async def fetch() -> str:
                    return order["id"]

                def count() -> int:
                    return len(order)

                text = await ctx.run(fetch, name="fetch")
                number = await ctx.run(count, name="count")
                later = ctx.run_async(fetch, name="later")
                other = ctx.run_async(count)
                assert_type(text, str)
                assert_type(number, int)
                assert_type(later, AsyncRunFuture[str])
                assert_type(other, AsyncRunFuture[int])
                return text + await later + str(number + await other)
            """
        )
    )
    command = ["mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    checked = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("where", ["same-worker", "other-worker"])
def test_waiting_for_a_running_invocation_parks_no_thread(where: str) -> None:
    """Clients retrying an order while it runs (here, or on another worker) wait
    for its outcome; each waiting ``ainvoke`` must not hold one of the loop's
    default-executor threads meanwhile: with as many waiters as threads, the
    running attempt could never get one (``asyncio.to_thread`` in its closure, or
    runjournal's own reads and lease writes), and everything stalled until the
    waiters' timeout (forever without one)."""
    gate: list[asyncio.Event] = []

    async def gated(ctx: AsyncContext, _: Any) -> int:
        async def step() -> int:
            await gate[0].wait()
            return await asyncio.to_thread(lambda: 1)  # a closure using the loop's threads

        return await ctx.run(step, name="step")

    backend = MemoryBackend()
    runner = Runtime(backend, worker_id="runner")
    waiter = runner if where == "same-worker" else Runtime(backend, worker_id="waiter")
    for rt in {runner, waiter}:
        rt.handler("gated")(gated)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        gate.append(asyncio.Event())
        first = asyncio.create_task(runner.ainvoke("gated", None, invocation_id="order-1"))
        await asyncio.sleep(0.05)  # the runner holds the invocation
        waiting = [
            asyncio.create_task(waiter.ainvoke("gated", None, invocation_id="order-1"))
            for _ in range(4)
        ]
        await asyncio.sleep(0.1)
        gate[0].set()
        try:
            return await asyncio.wait_for(asyncio.gather(first, *waiting), timeout=5)
        finally:
            for rt in {runner, waiter}:
                await rt.aclose()

    assert asyncio.run(main()) == [1] * 5
