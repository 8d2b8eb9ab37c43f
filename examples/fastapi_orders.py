"""A FastAPI order service whose side effects survive crashes: runjournal in an asyncio app.

``POST /orders/{order_id}`` runs the durable handler ``orders.process`` under the
invocation id ``order-{order_id}``: reserve stock, charge the card, schedule the
shipment while the invoice is issued, send a confirmation. Each step's outcome
is journaled before the next starts, so if the server dies mid-order, the order
resumes where it stopped (on restart, or on the client's retry) and a step that
finished is not done again. ``GET /orders/{order_id}`` tells where an order is.

Run it (FastAPI and uvicorn are the example's dependencies, not runjournal's)::

    pip install 'runjournal[lmdb]' fastapi uvicorn
    uvicorn examples.fastapi_orders:app
    curl -X POST localhost:8000/orders/42 -H 'content-type: application/json' \\
         -d '{"sku": "mug", "quantity": 2, "amount_cents": 1800, "email": "a@example.com"}'

Environment:

- ``RUNJOURNAL_URL``: the journal (default ``lmdb://orders-journal``, a directory
  in the working directory; ``lmdb:///var/lib/orders/journal`` in production).
- ``RUNJOURNAL_WORKER_ID``: this server's stable name among the journal's workers.
  A server restarted under the same id takes its unfinished orders back at once.
  Without it, the id is ``host/pid/random``: a worker on the same host still sees at
  once that the process is gone, but a worker on another machine waits for the
  lease (30 s) to lapse. Never give two live processes the same id: leave it unset
  with ``uvicorn --workers N`` (every worker process runs the lifespan, each with a
  Runtime of its own on the one journal), or derive one id per process.
- ``ORDERS_LEDGER``: the file standing in for the outside world (default
  ``orders-ledger.txt``). Every external side effect appends one line
  ``<step> <order id> [detail]`` to it (the charge's detail is its idempotency
  key), so you can count how often each happened.

What "once" means here: a step is *recorded* once, and a step that finished is
never run again. A step running when the process died has no outcome in the
journal, so it runs again on resume: its side effect may happen twice. That is
why the charge sends ``current_step().idempotency_key`` (the same on every
attempt, replay and worker): a payment API deduplicates by it. For an API that
cannot deduplicate, use ``at_most_once=True`` on the step instead.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from runjournal import (
    AsyncContext,
    InvocationMismatch,
    InvocationStatus,
    InvocationTimeout,
    RunOptions,
    Runtime,
    TerminalError,
    current_step,
)
from runjournal.journal import decode_value

__all__ = ["Ledger", "OrderRequest", "app", "ledger", "process_order"]

#: How long a simulated API call takes, each way (seconds).
LATENCY = (0.02, 0.12)


# -- the outside world (simulated) ---------------------------------------------------


class Ledger:
    """Stands in for the outside world: every side effect appends one line to a file.

    The file is opened with ``O_APPEND``, and each line is one ``write()``, so
    lines of concurrent calls (and of processes sharing the file) never mix.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    def open(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def append(self, step: str, order_id: str, *details: str) -> None:
        """Record one side effect. Blocking: call it from a worker thread."""
        if self._fd is None:
            raise RuntimeError("the ledger is not open (the app's lifespan opens it)")
        os.write(self._fd, (" ".join((step, order_id, *details)) + "\n").encode())


ledger = Ledger()


async def call_api(step: str, order_id: str, *details: str) -> None:
    """A simulated remote call: the request travels, the effect happens, the answer
    travels back. A crash after the effect and before the answer is journaled is the
    case where a step runs again."""
    await asyncio.sleep(random.uniform(*LATENCY))
    await asyncio.to_thread(ledger.append, step, order_id, *details)
    await asyncio.sleep(random.uniform(*LATENCY))


# -- the durable handler ------------------------------------------------------------


async def process_order(ctx: AsyncContext, order: dict[str, Any]) -> dict[str, Any]:
    """``orders.process``: one order, start to finish, each step journaled.

    The code between steps runs again on every resume, so it only decides what to
    do next; anything that touches the world goes inside ``ctx.run``.
    """
    order_id: str = order["order_id"]

    async def reserve_stock() -> str:
        await call_api("reserve-stock", order_id)
        return f"RES-{order_id}"

    async def charge_card() -> str:
        # The same key on every attempt, replay and worker: the payment API charges
        # once per key, even if this step runs again after a crash.
        key = current_step().idempotency_key
        await call_api("charge-card", order_id, key)
        return f"CH-{key[3:15]}"

    async def schedule_shipment() -> str:
        await call_api("schedule-shipment", order_id)
        return f"TRK-{order_id}"

    async def issue_invoice() -> str:
        await call_api("issue-invoice", order_id)
        return f"INV-{order_id}"

    def send_confirmation() -> None:
        # A plain (blocking) function, like an SMTP client: runjournal runs it in a
        # worker thread, never on the event loop.
        ledger.append("send-confirmation", order_id, order["email"])

    reservation = await ctx.run(reserve_stock, name="reserve-stock")
    charge = await ctx.run(charge_card, name="charge-card")
    # Started now, awaited later: the shipment is booked while the invoice is issued.
    shipment = ctx.run_async(schedule_shipment, name="schedule-shipment")
    invoice = await ctx.run(issue_invoice, name="issue-invoice")
    tracking = await shipment
    await ctx.run_void(send_confirmation, name="send-confirmation")
    return {
        "order_id": order_id,
        "status": "confirmed",
        "reservation": reservation,
        "charge": charge,
        "invoice": invoice,
        "tracking": tracking,
    }


# -- the web app ----------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ledger.open(os.environ.get("ORDERS_LEDGER", "orders-ledger.txt"))
    # One Runtime per process, made here (after uvicorn/gunicorn forked the workers).
    rt = Runtime(
        os.environ.get("RUNJOURNAL_URL", "lmdb://orders-journal"),
        worker_id=os.environ.get("RUNJOURNAL_WORKER_ID") or None,
        # Every step: at most 5 retries, then a journaled TerminalError (a 422 here);
        # jittered backoff, so workers sharing a flaky API do not retry in lock-step.
        options=RunOptions(max_retry_attempts=5, jitter=0.5),
    )
    rt.handler("orders.process")(process_order)
    # Orders a crashed server left half-done: start_recovery() (called inside the
    # running loop) is a task of this loop that takes them over at once and then
    # looks again every third of the lease, so it also finishes the orders of a
    # sibling worker (uvicorn --workers N) that dies later. The server starts serving
    # at once: a client retrying a recovering order simply waits for its outcome.
    # (`await rt.arecover(timeout=5)` instead would hold the start-up until the
    # orphans finish, or 5 s pass, and look only once.)
    rt.start_recovery()
    app.state.runtime = rt
    try:
        yield
    finally:
        await rt.aclose()  # hands this worker's leases back, so others resume at once
        ledger.close()


app = FastAPI(title="orders", lifespan=lifespan)


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


class OrderRequest(BaseModel):
    sku: str = Field(min_length=1)
    quantity: int = Field(default=1, ge=1)
    amount_cents: int = Field(ge=0)
    email: str


@app.post("/orders/{order_id}")
async def create_order(order_id: str, body: OrderRequest, rt: RuntimeDep) -> dict[str, Any]:
    """Process an order; safe to retry: the same id returns the same outcome."""
    try:
        output: dict[str, Any] = await rt.ainvoke(
            "orders.process",
            {"order_id": order_id, **body.model_dump()},
            invocation_id=f"order-{order_id}",
            timeout=30,  # how long to wait when another worker runs this order now
        )
    except TerminalError as exc:  # journaled: every retry gets the same answer
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    except InvocationMismatch as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    except InvocationTimeout as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    return output


@app.get("/orders/{order_id}")
async def get_order(order_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """Where an order is: pending, completed (with its output) or failed."""
    stored = await asyncio.to_thread(rt.backend.get_invocation, f"order-{order_id}")
    if stored is None:
        raise HTTPException(status_code=404, detail=f"no order {order_id!r}")
    answer: dict[str, Any] = {"order_id": order_id, "status": stored.status.value}
    if stored.status is InvocationStatus.COMPLETED and stored.output is not None:
        answer["output"] = decode_value(rt.codec, stored.output, "the order's output")
    elif stored.failure is not None:
        answer["error"] = stored.failure.message
    return answer
