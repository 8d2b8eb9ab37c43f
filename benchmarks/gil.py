"""Where W2's time goes: the cost of handing the GIL between threads on this machine.

    python -m benchmarks.gil

Prints (1) the round trip of two threads handing a lock back and forth, the
floor of any blocking hand-off; (2) a py-lmdb get+put alone and with another
thread busy, since py-lmdb releases the GIL on every call and must then wait
to get it back.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import lmdb


def handoff_round_trip_us(rounds: int = 20_000) -> float:
    """Microseconds for thread A to wake thread B and be woken back."""
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def partner() -> None:
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    thread = threading.Thread(target=partner)
    thread.start()
    start = time.perf_counter()
    for _ in range(rounds):
        ping.release()
        pong.acquire()
    elapsed = time.perf_counter() - start
    thread.join()
    return elapsed / rounds * 1e6


def lmdb_call_us(busy_threads: int, calls: int = 2000) -> float:
    """Microseconds per txn.get + txn.put while ``busy_threads`` run Python code."""
    stop = threading.Event()

    def busy() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    with tempfile.TemporaryDirectory() as tmp:
        env = lmdb.open(str(Path(tmp) / "gil"), map_size=64 << 20, sync=False)
        threads = [threading.Thread(target=busy) for _ in range(busy_threads)]
        for thread in threads:
            thread.start()
        try:
            with env.begin(write=True) as txn:
                start = time.perf_counter()
                for i in range(calls):
                    key = i.to_bytes(8, "big")
                    txn.get(key)
                    txn.put(key, b"v" * 100)
                elapsed = time.perf_counter() - start
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            env.close()
    return elapsed / calls * 1e6


def main() -> int:
    print(f"thread hand-off round trip:          {handoff_round_trip_us():8.1f} us")
    print(f"py-lmdb get+put, no other thread:    {lmdb_call_us(0):8.1f} us")
    print(f"py-lmdb get+put, one busy thread:    {lmdb_call_us(1, calls=200):8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
