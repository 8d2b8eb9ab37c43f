"""The engine: :class:`S3Backend`, the protocol's methods on top of the request layer.

The key layout and the guarantees are described in :mod:`runjournal.backends.s3`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import boto3
import botocore.config

from runjournal.backends._options import convert_options, one_of, seconds, text, whole
from runjournal.backends.s3._errors import NoSuchKey, PreconditionFailed
from runjournal.backends.s3._keys import KeyLayout, check_prefix, decode_id, encode_id
from runjournal.backends.s3._known import KnownInvocations, KnownRecord, PackJob
from runjournal.backends.s3._requests import S3Requests
from runjournal.backends.s3._segments import MAX_SEGMENT_BYTES, decode_segment, encode_segment
from runjournal.journal import (
    AppendEntry,
    BackendUnavailable,
    Capabilities,
    Entry,
    EntryConflict,
    Invocation,
    InvocationNotFound,
    InvocationStatus,
    JournalCorrupt,
    JournalError,
    TransientError,
    VersionConflict,
    Write,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
    write_each,
)

__all__ = ["S3Backend"]

log = logging.getLogger("runjournal.s3")


class S3Backend:
    """A journal in an S3 bucket (AWS S3, MinIO, Cloudflare R2, ...). Thread-safe.

    Args:
        client: a ready boto3 S3 client. Give it no retries of its own
            (``Config(retries={"total_max_attempts": 1})``): the engine retries
            transient failures itself and checks after a retried write whether
            the first try landed.
        bucket: the bucket; it must exist.
        prefix: every key lives under ``prefix/``; ids cannot escape it.
        segment_every: pack entries into a segment every this many entries.
        max_attempts: tries per request when the store fails transiently.
        backoff: the first retry delay in seconds (doubles, with jitter).
        max_backoff: the longest retry delay.
        sleep: how retries wait (tests pass a fake).
        owns_client: close ``client`` in :meth:`close`.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        segment_every: int = 100,
        max_attempts: int = 6,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        owns_client: bool = False,
    ) -> None:
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if segment_every < 2:
            raise ValueError("segment_every must be at least 2")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.client = client
        self.bucket = bucket
        self.prefix = check_prefix(prefix)
        self.segment_every = segment_every
        self.max_attempts = max_attempts
        self._layout = KeyLayout.under(self.prefix)
        self._requests = S3Requests(
            client,
            bucket,
            self._layout,
            max_attempts=max_attempts,
            backoff=backoff,
            max_backoff=max_backoff,
            sleep=sleep,
        )
        self._known = KnownInvocations()
        self._owns_client = owns_client
        self._closed = False
        self._pid = os.getpid()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: str | None = None,
        segment_every: int | str | None = None,
        max_attempts: int | str | None = None,
        connect_timeout: float | str | None = None,
        read_timeout: float | str | None = None,
        max_pool_connections: int | str | None = None,
    ) -> S3Backend:
        """Open ``s3://bucket/prefix``.

        Options (strings from the URL query, or values; None keeps the default):
        ``endpoint_url`` (MinIO, R2, ...), ``region``, ``profile``,
        ``addressing_style`` (auto/path/virtual), ``segment_every`` (100),
        ``max_attempts`` (6), ``connect_timeout`` (5) and ``read_timeout`` (30)
        seconds, ``max_pool_connections`` (32). Credentials come from boto3's
        standard chain (environment, profile, instance role).

        Raises:
            ValueError: the URL or an option value is malformed.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise ValueError(f"not an s3:// URL: {url.split('?')[0]!r}")
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(
                "an s3:// URL names only the bucket: credentials and ports do not go in it "
                "(use boto3's credential chain and endpoint_url=)"
            )
        if not parts.netloc:
            raise ValueError(f"s3:// URL {url.split('?')[0]!r} has no bucket")
        opts = convert_options(
            "s3",
            endpoint_url=(endpoint_url, text),
            region=(region, text),
            profile=(profile, text),
            addressing_style=(addressing_style, one_of("auto", "path", "virtual")),
            segment_every=(segment_every, whole(2)),
            max_attempts=(max_attempts, whole(1)),
            connect_timeout=(connect_timeout, seconds),
            read_timeout=(read_timeout, seconds),
            max_pool_connections=(max_pool_connections, whole(1)),
        )
        session = boto3.session.Session(
            profile_name=opts.get("profile"), region_name=opts.get("region")
        )
        config = botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=opts.get("connect_timeout", 5.0),
            read_timeout=opts.get("read_timeout", 30.0),
            max_pool_connections=opts.get("max_pool_connections", 32),
            s3={"addressing_style": opts.get("addressing_style", "auto")},
            # S3-compatible stores differ in which checksum headers they accept;
            # records carry their own CRC, so send checksums only when required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = session.client("s3", endpoint_url=opts.get("endpoint_url"), config=config)
        return cls(
            client,
            parts.netloc,
            unquote(parts.path),
            segment_every=opts.get("segment_every", 100),
            max_attempts=opts.get("max_attempts", 6),
            owns_client=True,
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, max_payload_bytes=16 * 1024 * 1024)

    def key_of(self, invocation_id: str) -> str:
        """The key of an invocation's record (for operators and tests)."""
        return self._layout.record(encode_id(invocation_id))

    def entry_key(self, invocation_id: str, index: int) -> str:
        """The key of one entry (for operators and tests)."""
        return self._layout.entry(encode_id(invocation_id), index)

    # -- checks --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(f"this S3 journal client ({self!r}) is closed")
        if self._pid != os.getpid():
            # A forked child shares the parent's connections (and its cache of
            # what exists): two processes on one socket garble both.
            raise BackendUnavailable(
                f"this S3 journal client ({self!r}) was opened in process {self._pid} "
                "before a fork; open a new one in this process"
            )

    def _check_writable(self) -> None:
        """Refuse a closed client, and a store that ignores conditional writes."""
        self._check_open()
        self._requests.require_conditional_writes()

    # -- invocations ---------------------------------------------------------------

    def _decode_record(self, data: bytes, invocation_id: str | None, key: str) -> Invocation:
        inv = decode_invocation(data)
        if invocation_id is not None and inv.id != invocation_id:
            raise JournalCorrupt(
                f"s3://{self.bucket}/{key} holds invocation {inv.id!r}, not {invocation_id!r}"
            )
        return inv

    def _remember(self, inv: Invocation, etag: str, marked: int | None = None) -> None:
        self._known.remember_record(inv.id, KnownRecord(inv.version, etag, inv.status, marked))

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        k = encode_id(invocation.id)
        key = self._layout.record(k)
        # A read first only saves writes when the id exists (a resume, or the
        # output of a finished one); creating still relies on If-None-Match.
        existing = self.get_invocation(invocation.id)
        if existing is not None:
            return existing, False
        self._check_writable()
        stored = attrs.evolve(invocation, version=1)
        body = encode_invocation(stored)
        # The marker goes first, so a pending record always has one.
        self._requests.put(self._layout.status_marker(stored.status, k, 1), b"")
        for _ in range(3):
            try:
                etag = self._requests.put(key, body, create_only=True)
                break
            except PreconditionFailed as exc:
                got = self._requests.get(key)
                if got is None:
                    continue  # deleted again since: try to create it once more
                if exc.retried and got[0] == body:
                    etag = got[1]  # our first try landed and its answer was lost
                    break
                current = self._decode_record(got[0], invocation.id, key)
                self._remember(current, got[1])
                return current, False
        else:
            raise TransientError(
                f"invocation {invocation.id!r} was created and deleted by others while this "
                "client tried to create it; try again"
            )
        # A new invocation has no entries: what this client appends is all there is.
        self._known.created(stored.id, KnownRecord(1, etag, stored.status, marked=1))
        return stored, True

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        self._check_open()
        key = self._layout.record(encode_id(invocation_id))
        got = self._requests.get(key)
        if got is None:
            self._known.forget(invocation_id)
            return None
        inv = self._decode_record(got[0], invocation_id, key)
        self._remember(inv, got[1])
        return inv

    def update_invocation(self, invocation: Invocation) -> Invocation:
        self._check_writable()
        k = encode_id(invocation.id)
        key = self._layout.record(k)
        record = self._known.record(invocation.id)
        if record is None or record.version != invocation.version:
            got = self._requests.get(key)
            if got is None:
                self._known.forget(invocation.id)
                raise InvocationNotFound(invocation.id)
            current = self._decode_record(got[0], invocation.id, key)
            self._remember(current, got[1])
            if current.version != invocation.version:
                raise VersionConflict(invocation.id, invocation.version, current.version)
            record = KnownRecord(current.version, got[1], current.status)
        stored = attrs.evolve(invocation, version=invocation.version + 1)
        body = encode_invocation(stored)
        # Marker first (see create_invocation); a loser's marker is filtered
        # out when listing, since listing checks the record itself. An update
        # that keeps the status (a lease taken or renewed, a step's progress)
        # keeps the marker it has: one PUT in all.
        moved = stored.status is not record.status
        if moved:
            self._requests.put(self._layout.status_marker(stored.status, k, stored.version), b"")
        try:
            new_etag = self._requests.put(key, body, if_match=record.etag)
        except NoSuchKey:
            self._known.forget(invocation.id)
            raise InvocationNotFound(invocation.id) from None
        except PreconditionFailed as exc:
            got = self._requests.get(key)
            if got is None:
                self._known.forget(invocation.id)
                raise InvocationNotFound(invocation.id) from exc
            if not (exc.retried and got[0] == body):
                current = self._decode_record(got[0], invocation.id, key)
                self._remember(current, got[1])
                raise VersionConflict(invocation.id, invocation.version, current.version) from exc
            new_etag = got[1]  # our first try landed and its answer was lost
        self._remember(stored, new_etag, stored.version if moved else record.marked)
        if moved:
            self._drop_markers(invocation.id, k, record.status, record.marked)
        if moved and stored.status is not InvocationStatus.PENDING:
            self._pack(stored.id, k, final=True)  # once, when it finishes
        return stored

    def _drop_markers(
        self, invocation_id: str, k: str, status: InvocationStatus, marked: int | None
    ) -> None:
        """Delete the markers saying ``invocation_id`` has ``status`` (it has another now).

        A status is marked once, by the update that set it; updates that kept
        it wrote none. ``marked``: that update's version, if this client knows
        it (one DELETE); else the markers are listed first.
        """
        if marked is None and status is InvocationStatus.PENDING:
            marked = 1  # an invocation is pending from its creation, marked then, only
        try:
            if marked is not None:
                self._requests.delete(self._layout.status_marker(status, k, marked))
            else:
                stale = self._requests.list_keys(self._layout.status_dir(status, k))
                self._requests.delete_many(stale)
        except JournalError as exc:  # the update stands; listing skips a stale marker
            log.warning("invocation %r: stale status marker left: %s", invocation_id, exc)

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        self._check_open()
        if status is None:
            root = self._layout.records_dir
            segments = [key[len(root) :] for key in self._requests.list_keys(root)]
            found = self._requests.map(self._id_of_segment, segments)
            return iter(sorted(i for i in found if i is not None))
        # Markers may be stale (a crash between steps, a lost CAS race): each
        # candidate's record has the last word, and no entry key is read.
        base = self._layout.status_dir(status)
        listed = self._requests.list_keys(base)
        candidates = sorted({key[len(base) :].split("/", 1)[0] for key in listed})

        def current(k: str) -> str | None:
            key = self._layout.record(k)
            got = self._requests.get(key)
            if got is None:
                return None
            inv = self._decode_record(got[0], decode_id(k), key)
            return inv.id if inv.status is status else None

        return iter(sorted(i for i in self._requests.map(current, candidates) if i is not None))

    def _id_of_segment(self, k: str) -> str | None:
        invocation_id = decode_id(k)
        if invocation_id is not None:
            return invocation_id
        key = self._layout.record(k)
        got = self._requests.get(key)
        if got is None:  # deleted since it was listed
            return None
        inv = self._decode_record(got[0], None, key)
        if encode_id(inv.id) != k:
            raise JournalCorrupt(f"s3://{self.bucket}/{key} holds invocation {inv.id!r}")
        return inv.id

    def delete_invocation(self, invocation_id: str) -> bool:
        self._check_writable()
        k = encode_id(invocation_id)
        key = self._layout.record(k)
        existed = self._requests.exists(key)
        doomed = self._requests.list_keys(self._layout.entries_dir(k))
        doomed += self._requests.list_keys(self._layout.segments_dir(k))
        for status in InvocationStatus:
            doomed += self._requests.list_keys(self._layout.status_dir(status, k))
        # What this client knew is void from here (it must not pack deleted entries).
        self._known.forget(invocation_id)
        # The record goes last: an interrupted delete leaves a record whose
        # journal is partly gone (delete it again), never entries a new
        # invocation under the same id would replay.
        self._requests.delete_many(doomed)
        if existed:
            self._requests.delete(key)
        # Again: an append racing this delete may have found the record meanwhile.
        self._known.forget(invocation_id)
        return existed

    # -- entries -------------------------------------------------------------------

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        """Write ``entry`` create-only; see :meth:`JournalBackend.append_entry`.

        The invocation must exist. A client that created, read or updated
        its record, or appended to it before, knows it does and makes no
        extra request; otherwise one HEAD of the record checks, and the
        client remembers the answer. It forgets when its cache of 512
        invocations drops the least recently used one (the next append
        checks again), and when it deletes the invocation itself or finds
        its record gone.

        Limitation: a client that knows an invocation does not notice
        *another* client deleting it; its appends still land, under a record
        that is gone, and a later invocation with the same id would replay
        them. As the README says, do not delete a running invocation.

        Raises:
            EntryConflict: an entry already exists at that index.
            InvocationNotFound: no invocation is stored under that id.
        """
        self._check_writable()
        k = encode_id(invocation_id)
        key = self._layout.entry(k, entry.index)
        body = encode_entry(entry, invocation_id)
        if not self._known.exists(invocation_id):
            if not self._requests.exists(self._layout.record(k)):
                raise InvocationNotFound(invocation_id)
            self._known.confirm_exists(invocation_id)
        try:
            self._requests.put(key, body, create_only=True)
        except PreconditionFailed as exc:
            # After a retry the object may be our own first try, answered into
            # a dropped connection: the same bytes mean the step is recorded.
            got = self._requests.get(key) if exc.retried else None
            if got is None or got[0] != body:
                raise EntryConflict(invocation_id, entry.index) from exc
        unpacked = self._known.add_entry(invocation_id, entry.index, body)
        if unpacked >= self.segment_every:
            self._pack(invocation_id, k, final=False)

    def write_batch(self, writes: Sequence[Write]) -> list[object]:
        """The writes as parallel requests (S3 has no transactions; each write is
        atomic alone); see :class:`runjournal.journal.BatchWriter`."""
        self._check_open()
        if len(writes) <= 1:
            return write_each(self, writes)
        # Writes to one invocation keep their order (an append may follow its create).
        groups: dict[str, list[int]] = {}
        for position, write in enumerate(writes):
            key = write.invocation_id if isinstance(write, AppendEntry) else write.invocation.id
            groups.setdefault(key, []).append(position)
        results: list[object] = [None] * len(writes)

        def run(key: str) -> None:
            positions = groups[key]
            for position, result in zip(
                positions, write_each(self, [writes[p] for p in positions]), strict=True
            ):
                results[position] = result

        self._requests.map(run, list(groups))
        return results

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        self._check_open()
        k = encode_id(invocation_id)
        records: list[tuple[int, bytes]] = []
        covered = 0  # entries [0, covered) came from a segment
        newest = 0
        for _ in range(3):
            newest, segment_key = self._latest_segment(k)
            if segment_key is None or newest <= start:
                break
            got = self._requests.get(segment_key)
            if got is not None:
                where = f"s3://{self.bucket}/{segment_key}"
                records = list(enumerate(decode_segment(got[0], newest, where)))
                covered = newest
                break
            # Superseded by a newer segment and removed since it was listed: look again.
        directory = self._layout.entries_dir(k)
        first_loose = max(start, covered)
        after = self._layout.entry(k, first_loose - 1) if first_loose > 0 else None
        loose_keys = self._requests.list_keys(directory, start_after=after)
        loose = self._requests.map(self._requests.get_bytes, loose_keys)
        for key, data in zip(loose_keys, loose, strict=True):
            if data is not None:  # None: deleted since it was listed
                records.append((KeyLayout.number_in(key, directory), data))
        entries = []
        for index, data in records:
            entry = decode_entry(data, invocation_id)
            if entry.index != index:
                raise JournalCorrupt(
                    f"invocation {invocation_id!r}: the entry stored at index {index} "
                    f"says it is index {entry.index}"
                )
            if index >= start:
                entries.append(entry)
        self._known.read(invocation_id, records, newest, whole=start == 0)
        return entries

    def _latest_segment(self, k: str) -> tuple[int, str | None]:
        directory = self._layout.segments_dir(k)
        keys = self._requests.list_keys(directory)
        if not keys:
            return 0, None
        best = max(keys, key=lambda key: KeyLayout.number_in(key, directory))
        return KeyLayout.number_in(best, directory), best

    def _pack(self, invocation_id: str, k: str, *, final: bool) -> None:
        """Write entries [0, n) as one segment, if this client knows a longer run.

        ``final``: the invocation just finished; read its journal first if this
        client did not, and drop the entries it knows afterwards. Only an
        optimisation: failures are logged, never raised, since the entries
        themselves are already durable.
        """
        try:
            if final and not self._known.is_loaded(invocation_id):
                # Its journal was not read here: read it once, which also
                # finds the newest segment.
                self.read_entries(invocation_id)
            job = self._known.begin_pack(invocation_id)
            if job is not None:
                packed = False
                try:
                    self._write_segment(k, job)
                    packed = True
                finally:
                    self._known.end_pack(job, packed=packed)
        except JournalError as exc:
            log.warning("invocation %r: could not pack its entries: %s", invocation_id, exc)
        if final:
            self._known.release_entries(invocation_id)

    def _write_segment(self, k: str, job: PackJob) -> None:
        body = encode_segment(job.records)
        if len(body) > MAX_SEGMENT_BYTES:
            return  # replay reads these entries one by one
        # A refusal means another client packed the same run: same bytes.
        with suppress(PreconditionFailed):
            self._requests.put(self._layout.segment(k, job.end), body, create_only=True)
        if job.previous:
            self._requests.delete(self._layout.segment(k, job.previous))

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # the connections and the pool are the parent's to close
        self._known.clear()
        self._requests.close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> S3Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return f"S3Backend(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={endpoint!r})"
