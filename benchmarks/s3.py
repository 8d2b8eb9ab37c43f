"""The S3 engine for the benchmark suite, against a moto server on 127.0.0.1.

The server is :mod:`runjournal.backends.s3.testing`'s (the one the tests use).

``s3_engine(workdir)`` starts the server, creates a bucket and yields
``(opener, counter)``: ``opener()`` opens a new :class:`runjournal.backends.s3.S3Backend`
client on a journal of its own (a fresh prefix, as the LMDB engine gets a
fresh directory per run; ``opener.again()`` opens another client on the last
one), and ``counter`` counts the HTTP requests of every client opened, by S3
operation (botocore's ``before-send`` event).

Run it directly for the request counts of W1, W2 and a 1000-step replay::

    python -m benchmarks.s3

moto is an in-process Python server: the rates measure the engine plus moto
on the same cores, not S3, whose latency (10-50 ms per request) dominates in
production. The request counts carry over.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from runjournal.backends.s3 import S3Backend
from runjournal.backends.s3.testing import MotoS3, RequestCounter, running_moto
from runjournal.context._lease import HEARTBEAT

__all__ = ["S3Opener", "measure_requests", "s3_engine"]


class S3Opener:
    """Opens engine clients on the benchmark bucket; each call a fresh journal."""

    def __init__(self, server: MotoS3, bucket: str, counter: RequestCounter) -> None:
        self.server = server
        self.bucket = bucket
        self.counter = counter
        self.prefix = ""

    def __call__(self) -> S3Backend:
        self.prefix = f"bench-{uuid.uuid4().hex[:12]}"
        return self.again()

    def again(self) -> S3Backend:
        """Another client on the journal the last call opened."""
        client: Any = self.counter.attach(self.server.client(pool=64))
        return S3Backend(client, self.bucket, self.prefix, owns_client=True)


@contextmanager
def s3_engine(workdir: Path) -> Iterator[tuple[S3Opener, RequestCounter]]:
    """A moto S3 server on 127.0.0.1 with one bucket; yields ``(opener, counter)``.

    ``workdir`` is not used: moto keeps the objects in memory.
    """
    del workdir
    with running_moto() as server:
        counter = RequestCounter()
        yield S3Opener(server, server.new_bucket(), counter), counter


def measure_requests(opener: S3Opener, counter: RequestCounter) -> dict[str, float]:
    """Count the S3 requests of W1, W2 and a 1000-step replay (moto-independent figures)."""
    from benchmarks._workloads import (
        STEPS,
        W2_INVOCATIONS,
        W2_STEPS,
        _Crash,
        _steps_runtime,
        w2_concurrent,
    )

    # W1: 1000 sequential steps in one invocation (the client's one-off probe included).
    backend = opener()
    counter.reset()
    _steps_runtime(backend, STEPS).invoke("bench.steps", None, invocation_id="w1")
    w1 = counter.total
    backend.close()

    # W2: 64 invocations x 10 steps from threads, one client.
    counter.reset()
    w2_concurrent(opener)
    w2 = counter.total

    # W3: a 1000-step journal left pending, replayed by another client.
    writer = opener()
    crash = [True]
    with suppress(_Crash):
        _steps_runtime(writer, STEPS, crash).invoke("bench.steps", None, invocation_id="w3")
    writer.close()
    reader = opener.again()
    crash[0] = False
    counter.reset()
    _steps_runtime(reader, STEPS, crash).invoke("bench.steps", None, invocation_id="w3")
    replay = counter.total
    reader.close()
    # Reading the now completed journal (packed into a segment) from a new client.
    again = opener.again()
    counter.reset()
    entries = again.read_entries("w3")
    read_completed = counter.total
    again.close()
    assert len(entries) == STEPS
    one, many = (measure_heartbeat(opener, counter, held=n) for n in (1, 20))
    return {
        "heartbeat_requests_per_renewal_holding_1": one,
        "heartbeat_requests_per_renewal_holding_20": many,
        # A renewal every third of the lease: 6 a minute at the default 30 s.
        "heartbeat_requests_per_minute_default_lease": many * 60 / (30 * HEARTBEAT),
        "w1_requests_per_step": w1 / STEPS,
        "w2_requests_per_step": w2 / (W2_INVOCATIONS * W2_STEPS),
        "w3_requests_replay_1000_and_complete": replay,
        "requests_read_completed_1000": read_completed,
    }


def measure_heartbeat(
    opener: S3Opener, counter: RequestCounter, *, held: int, lease: float = 0.6
) -> float:
    """S3 requests per heartbeat of one worker holding ``held`` invocations.

    ``held`` invocations block inside a step while the worker's heartbeat runs
    for five leases; every request in that window is the heartbeat's (the
    first renewal creates the liveness record, the others update it).
    """
    from runjournal.context import Context, Runtime

    backend = opener()
    runtime = Runtime(backend, lease=lease)
    entered = threading.Semaphore(0)
    release = threading.Event()

    @runtime.handler("bench.hold")
    def hold(ctx: Context, n: int) -> int:
        def block() -> int:
            entered.release()
            release.wait(60)
            return n

        return ctx.run(block, name="hold")

    threads = [threading.Thread(target=runtime.invoke, args=("bench.hold", n)) for n in range(held)]
    for thread in threads:
        thread.start()
    for _ in range(held):
        entered.acquire(timeout=60)
    counter.reset()
    time.sleep(5 * lease)
    requests = counter.total
    release.set()
    for thread in threads:
        thread.join(60)
    runtime.close()
    backend.close()
    beats = 5 * lease / (lease * HEARTBEAT)
    return requests / beats


def _main() -> None:  # pragma: no cover - a measurement, run by hand
    with s3_engine(Path(".")) as (opener, counter):
        for name, value in measure_requests(opener, counter).items():
            print(f"{name}: {value:g}")


if __name__ == "__main__":
    _main()
