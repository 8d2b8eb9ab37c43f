"""Leases: which worker runs an invocation, and how a worker shows it is alive.

A lease is data on the invocation record (:class:`runjournal.journal.Lease`:
owner, incarnation, epoch, expiry), changed only by compare-and-swap. It is
taken with the record's creation (no extra write) or by a takeover, and lasts
at least until its own expiry, one lease after it was taken.

Renewing every lease a worker holds would cost a write per invocation per
heartbeat, so a worker whose attempts outlive the first heartbeat renews one
*liveness record* instead: an invocation record of its own (id
``runjournal.worker:<worker id>``, handler ``runjournal.worker``, status
completed, so ``recover`` never lists it) saying which incarnation of the
worker is alive until when. An invocation whose lease expiry has passed is
still held while its owner's liveness record names the same incarnation and
is unexpired. Short invocations never need the record, so a worker that only
runs them never writes one.

An incarnation is a random number a worker draws when it starts. A takeover
*fences* a dead incarnation: it marks the owner's liveness record as "this
incarnation is dead" (expiry 0), creating it if need be, before taking the
invocation. A stalled worker that wakes up finds its renewal refused, so it
knows every lease of that incarnation is void; its attempts stop at their next
ctx operation (:class:`LeaseLost`) and it draws a new incarnation.

Clocks: expiries are wall-clock times, compared by other workers against
their own clocks. A worker trusts its own leases only for ``0.75 * lease``
after it took or last renewed them (measured on its monotonic clock), so
clocks may disagree by up to a quarter of the lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import attrs

from runjournal.context._errors import LeaseLost
from runjournal.context._log import emit
from runjournal.journal import (
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalBackend,
    JournalError,
    Lease,
    VersionConflict,
)

__all__ = [
    "RELEASED",
    "process_gone",
    "TRUST",
    "WORKER_HANDLER",
    "WORKER_PREFIX",
    "Held",
    "Liveness",
    "default_worker_id",
    "is_worker_record",
    "worker_record_id",
]

WORKER_PREFIX = "runjournal.worker:"
WORKER_HANDLER = "runjournal.worker"
#: The share of the lease a worker trusts its own leases for after taking or renewing them.
TRUST = 0.75
#: How often, in leases, the heartbeat renews.
HEARTBEAT = 1 / 3
#: The incarnation of a lease given up on purpose: void at once.
RELEASED = 0


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so PIDs are compared only within one."""
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino:x}"
    except OSError:
        return "0"


def default_worker_id() -> str:
    """``host/pid/namespace-random``: unique per process, readable in listings.

    A worker on the same host (and PID namespace) can tell from it whether
    the process is still there (see :func:`process_gone`).
    """
    return f"{socket.gethostname()}/{os.getpid()}/{_pid_namespace()}-{secrets.token_hex(3)}"


def process_gone(worker_id: str) -> bool:
    """Whether ``worker_id`` is a default id of a process of this host and PID
    namespace that no longer exists (so its leases are void, whatever their expiry).

    False whenever it cannot be sure: another host, a chosen worker id, a PID
    now used by another process.
    """
    parts = worker_id.split("/")
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return False
    pid_text, token = parts[1], parts[2]
    if not pid_text.isdigit() or token.partition("-")[0] != _pid_namespace():
        return False
    pid = int(pid_text)
    if pid == os.getpid() or pid <= 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but not ours to signal
        return False
    try:  # a killed child its parent has not reaped yet is a zombie: gone too
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


def worker_record_id(worker_id: str) -> str:
    """The id of a worker's liveness record."""
    return WORKER_PREFIX + worker_id


def is_worker_record(inv: Invocation) -> bool:
    """Whether ``inv`` is a worker's liveness record, not an invocation."""
    return inv.handler == WORKER_HANDLER and inv.id.startswith(WORKER_PREFIX)


def _new_incarnation() -> int:
    return secrets.randbits(62) + 1  # never RELEASED


@attrs.frozen
class Held:
    """An invocation another live worker holds: who, and until when at least."""

    owner: str
    until: float


Backend = Callable[[], JournalBackend]


class Liveness:
    """This worker's incarnation, its liveness record and heartbeat, and whether its
    leases hold.

    Args:
        backend: returns the journal (read on every use: tests swap it).
        worker_id: this worker's id (unique among live workers).
        lease: seconds a lease lasts without renewal.
        busy: whether the worker runs anything now (the heartbeat renews only then).
        wall: the wall clock expiries are written in.
        monotonic: the clock this worker measures its own trust window on.
    """

    def __init__(
        self,
        backend: Backend,
        worker_id: str,
        lease: float,
        *,
        busy: Callable[[], bool],
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.lease = lease
        self._backend = backend
        self._is_busy = busy
        self._wall = wall
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._incarnation = _new_incarnation()
        self._record: Invocation | None = None  # the liveness record, once written
        self._trusted_until = float("-inf")  # by renewals of the liveness record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking leases -------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        """The incarnation leases are taken under now."""
        return self._incarnation

    def new_lease(self, epoch: int = 1) -> Lease:
        """A lease for an invocation this worker creates (epoch 1) or takes over."""
        return Lease(self.worker_id, self._incarnation, epoch, self._wall() + self.lease)

    def trust_from_now(self) -> float:
        """Until when (monotonic) a lease taken now may be trusted without renewal."""
        return self._monotonic() + self.lease * TRUST

    def stale(self) -> bool:
        """Whether :meth:`refresh` would write (a liveness record whose renewal is stale)."""
        return self._record is not None and self._monotonic() >= self._trusted_until

    def fresh(self, incarnation: int, trusted_until: float) -> bool:
        """Whether :meth:`check` would pass without touching the journal."""
        now = self._monotonic()
        return incarnation == self._incarnation and (
            now < trusted_until or now < self._trusted_until
        )

    def refresh(self) -> None:
        """Before taking a lease: renew a liveness record whose renewal has gone stale.

        A worker that was idle long enough to be fenced learns it here, and
        takes the new lease under a fresh incarnation.
        """
        if self._record is not None and self._monotonic() >= self._trusted_until:
            self.renew()

    def check(self, incarnation: int, trusted_until: float, invocation_id: str) -> None:
        """Raise :class:`LeaseLost` unless a lease of ``incarnation`` still holds.

        ``trusted_until`` is how long the lease itself may be trusted (from
        when it was taken); past it, the liveness record must have been
        renewed lately, or is renewed now.
        """
        now = self._monotonic()
        if incarnation == self._incarnation and (now < trusted_until or now < self._trusted_until):
            return
        with self._lock:
            if incarnation == self._incarnation and self._monotonic() >= max(
                trusted_until, self._trusted_until
            ):
                self.renew()
            if incarnation != self._incarnation:
                raise LeaseLost(
                    invocation_id,
                    f"worker {self.worker_id!r} was fenced: another worker took over after its "
                    "lease expired",
                )
            if self._monotonic() >= max(trusted_until, self._trusted_until):
                raise LeaseLost(
                    invocation_id, f"worker {self.worker_id!r} could not renew its lease in time"
                )

    def start(self) -> None:
        """Start the heartbeat (once): it renews while the worker is busy."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._beat, name=f"runjournal-heartbeat-{self.worker_id}", daemon=True
                )
                self._thread.start()

    # -- the liveness record ---------------------------------------------------

    def renew(self) -> bool:
        """Write this incarnation's new expiry into the liveness record (creating it).

        Returns False if the journal could not be reached. Finding the
        incarnation fenced voids it: a new one is drawn and registered.
        """
        with self._lock:
            started = self._monotonic()
            now = self._wall()
            lease = Lease(self.worker_id, self._incarnation, 0, now + self.lease)
            backend = self._backend()
            try:
                if self._record is None:
                    stored, created = backend.create_invocation(self._new_record(lease, now))
                    if not created:
                        stored = self._take_over_record(backend, stored, lease, now)
                else:
                    try:
                        stored = backend.update_invocation(
                            attrs.evolve(self._record, updated_at=now, lease=lease)
                        )
                    except (VersionConflict, InvocationNotFound):
                        latest = backend.get_invocation(worker_record_id(self.worker_id))
                        if latest is None:
                            stored, created = backend.create_invocation(
                                self._new_record(lease, now)
                            )
                            if not created:
                                stored = self._take_over_record(backend, stored, lease, now)
                        else:
                            stored = self._take_over_record(backend, latest, lease, now)
            except JournalError as exc:
                emit(
                    logging.WARNING,
                    "worker %r could not renew its lease: %s: %s",
                    self.worker_id,
                    type(exc).__name__,
                    exc,
                    worker_id=self.worker_id,
                )
                return False
            self._record = stored
            self._trusted_until = started + self.lease * TRUST
            return True

    def _new_record(self, lease: Lease, now: float) -> Invocation:
        return Invocation(
            id=worker_record_id(self.worker_id),
            handler=WORKER_HANDLER,
            input=b"",
            codec="json",
            status=InvocationStatus.COMPLETED,
            output=b"null",
            created_at=now,
            updated_at=now,
            lease=lease,
        )

    def _take_over_record(
        self, backend: JournalBackend, stored: Invocation, lease: Lease, now: float
    ) -> Invocation:
        """Write ``lease`` over a liveness record someone else wrote last.

        If it says this incarnation is dead (a takeover fenced it), this
        incarnation's leases are void: draw a new one first. Another
        incarnation's record (an earlier life of this worker id) is simply
        replaced.
        """
        for _ in range(8):
            current = stored.lease
            fenced = (
                current is not None
                and current.incarnation == self._incarnation
                and current.expires_at <= now
            )
            if fenced:
                emit(
                    logging.WARNING,
                    "worker %r was fenced (another worker took over its invocations after "
                    "its lease expired); its running attempts stop, and it goes on as a new "
                    "incarnation",
                    self.worker_id,
                    worker_id=self.worker_id,
                )
                self._incarnation = _new_incarnation()
                lease = attrs.evolve(lease, incarnation=self._incarnation)
            try:
                return backend.update_invocation(attrs.evolve(stored, updated_at=now, lease=lease))
            except VersionConflict:
                latest = backend.get_invocation(stored.id)
                if latest is None:
                    raise InvocationNotFound(stored.id) from None
                stored = latest
        raise JournalError(f"liveness record {stored.id!r} keeps changing; try again")

    def release(self) -> None:
        """Stop the heartbeat and declare this incarnation dead, so others take over at once."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            record, dead = self._record, self._incarnation
            self._incarnation = _new_incarnation()
            self._record = None
            self._trusted_until = float("-inf")
        if record is None:
            return  # no record: every lease of this incarnation lapses with its own expiry
        try:
            self._backend().update_invocation(
                attrs.evolve(
                    record,
                    updated_at=self._wall(),
                    lease=Lease(self.worker_id, dead, 0, 0.0),
                )
            )
        except JournalError as exc:  # best effort: the lease expires anyway
            emit(
                logging.INFO,
                "worker %r: could not release its liveness record: %s",
                self.worker_id,
                exc,
                worker_id=self.worker_id,
            )

    def close(self) -> None:
        """Stop the heartbeat without touching the journal (after a fork, say)."""
        self._stop.set()

    def _beat(self) -> None:
        interval = self.lease * HEARTBEAT
        while not self._stop.wait(interval):
            if self._is_busy():
                try:
                    self.renew()
                except Exception:  # the heartbeat must outlive any one failure
                    emit(
                        logging.ERROR,
                        "worker %r: heartbeat failed",
                        self.worker_id,
                        worker_id=self.worker_id,
                        exc_info=True,
                    )

    # -- other workers' leases -----------------------------------------------------

    def holder(self, lease: Lease) -> Held | None:
        """Whether ``lease`` still holds; if its owner's incarnation is dead, fence it.

        Returns who holds it (and until when at least), or None: the lease is
        void and its incarnation fenced, so the invocation may be taken.
        """
        if lease.incarnation == RELEASED or process_gone(lease.owner):
            return None
        if self._wall() < lease.expires_at:
            return Held(lease.owner, lease.expires_at)
        backend = self._backend()
        record_id = worker_record_id(lease.owner)
        dead = Lease(lease.owner, lease.incarnation, 0, 0.0)
        for _ in range(8):
            record = backend.get_invocation(record_id)
            if record is None:
                # It never renewed (its attempts were short): mark the incarnation
                # dead, so if it is only stalled it learns so when it wakes up.
                now = self._wall()
                marker = Invocation(
                    id=record_id,
                    handler=WORKER_HANDLER,
                    input=b"",
                    codec="json",
                    status=InvocationStatus.COMPLETED,
                    output=b"null",
                    created_at=now,
                    updated_at=now,
                    lease=dead,
                )
                if backend.create_invocation(marker)[1]:
                    return None
                continue  # it registered meanwhile: look again
            current = record.lease
            if current is None or current.incarnation != lease.incarnation:
                return None  # that incarnation is over (fenced before, or the worker restarted)
            if self._wall() < current.expires_at:
                return Held(lease.owner, current.expires_at)
            if current.expires_at == 0.0:
                return None  # already fenced, or released
            try:
                backend.update_invocation(attrs.evolve(record, updated_at=self._wall(), lease=dead))
            except (VersionConflict, InvocationNotFound):
                continue  # it renewed (or someone fenced it) meanwhile: look again
            emit(
                logging.INFO,
                "worker %r fenced incarnation %d of worker %r, whose lease expired",
                self.worker_id,
                lease.incarnation,
                lease.owner,
                worker_id=self.worker_id,
            )
            return None
        raise JournalError(f"liveness record {record_id!r} keeps changing; try again")
