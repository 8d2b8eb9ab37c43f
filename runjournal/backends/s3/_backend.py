"""The S3 engine: one journal shared by many machines through an object store.

Every guarantee comes from S3's conditional writes, never from a
check-then-write: an entry is created with ``If-None-Match: *`` (a second
writer at the same index gets :class:`runjournal.journal.EntryConflict`), an invocation
record is replaced with ``If-Match: <etag>`` (compare-and-swap; a loser gets
:class:`runjournal.journal.VersionConflict`). A store that silently ignores those headers
is detected on the first write and refused.

Keys, under ``<prefix>/`` (``<k>`` is the invocation id's key segment, see
:func:`encode_id`; numbers are zero-padded to 20 digits so keys sort by number)::

    inv/<k>                       the invocation record (journal.encode_invocation)
    ent/<k>/<index>               one entry, written once (journal.encode_entry)
    seg/<k>/<end>                 entries [0, end) packed into one object (a read cache)
    status/<status>/<k>/<version> an empty marker: version <version> has <status>
    probe/<random>                short-lived, for the conditional-write check

Entries stay the source of truth: a segment only ever packs a gap-free run
of entries this client read or wrote itself, entries are immutable, and the
per-index objects are never removed, so an append at an index a segment
covers still meets its object and conflicts.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import attrs
import boto3
import botocore.config
import botocore.exceptions

from runjournal.backends._options import (
    convert_options,
    one_of,
    seconds,
    text,
    whole,
)
from runjournal.journal import (
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
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
)

__all__ = ["MAX_PREFIX_BYTES", "S3Backend", "decode_id", "encode_id"]

log = logging.getLogger("runjournal.s3")

T = TypeVar("T")

#: The longest key segment an id maps to reversibly; longer ones are hashed.
MAX_SEGMENT_CHARS: Final = 512
#: The longest prefix accepted, so every key stays under S3's 1024-byte limit.
MAX_PREFIX_BYTES: Final = 400
#: A segment is not written past this size (replay then reads entries one by one).
MAX_SEGMENT_BYTES: Final = 64 * 1024 * 1024
_MAX_INDEX: Final = 10**20 - 1
_HASHED: Final = "~~"
_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPED: Final = re.compile(r"~([0-9A-F]{2})")
_SEGMENT_MAGIC: Final = b"RJS1"
_U32: Final = struct.Struct(">I")
_SEGMENT_HEADER: Final = struct.Struct(">4sQ")
# Tracked invocations per client (record ETags and entries for packing).
_STATE_LIMIT: Final = 512


# -- ids and keys ----------------------------------------------------------------


def encode_id(invocation_id: str) -> str:
    """Map an invocation id to one key segment, injectively.

    ASCII letters, digits, ``-`` and ``_`` stay as they are; every other
    character becomes ``~XX`` per UTF-8 byte, so the segment holds no ``/``
    and is never ``.`` or ``..``. An escaped id longer than
    :data:`MAX_SEGMENT_CHARS` becomes ``~~`` and the SHA-256 of its UTF-8
    bytes (an escaped id never contains ``~~``, so the two forms never meet).
    """
    escaped = "".join(
        ch if ch in _SAFE else "".join(f"~{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        for ch in invocation_id
    )
    if len(escaped) <= MAX_SEGMENT_CHARS:
        return escaped
    digest = hashlib.sha256(invocation_id.encode("utf-8", "surrogatepass")).hexdigest()
    return _HASHED + digest


def decode_id(segment: str) -> str | None:
    """Invert :func:`encode_id`; None for a hashed segment (read the record for its id).

    Raises:
        JournalCorrupt: the segment is not one :func:`encode_id` produces.
    """
    if segment.startswith(_HASHED):
        return None
    if any(ch not in _SAFE and ch != "~" for ch in segment):
        raise JournalCorrupt(f"S3 key segment {segment!r} is not an encoded invocation id")
    out = bytearray()
    pos = 0
    for match in _ESCAPED.finditer(segment):
        out += segment[pos : match.start()].encode("ascii")
        out.append(int(match.group(1), 16))
        pos = match.end()
    rest = segment[pos:]
    if "~" in rest:
        raise JournalCorrupt(f"S3 key segment {segment!r} has a stray '~'")
    out += rest.encode("ascii")
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise JournalCorrupt(f"S3 key segment {segment!r} is not UTF-8") from exc


def _number(n: int) -> str:
    if not 0 <= n <= _MAX_INDEX:
        raise ValueError(f"{n} is out of the range the S3 engine stores (0..{_MAX_INDEX})")
    return f"{n:020d}"


def _check_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_PREFIX_BYTES:
        raise ValueError(f"S3 prefix is longer than {MAX_PREFIX_BYTES} bytes: {prefix!r}")
    for part in prefix.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"S3 prefix {prefix!r} has an empty, '.' or '..' segment")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix):
        raise ValueError(f"S3 prefix {prefix!r} contains a control character")
    return prefix


# -- segments --------------------------------------------------------------------


def _encode_segment(records: list[bytes]) -> bytes:
    """Pack entry records [0, len) as ``magic | end | (length | record)* | CRC-32``."""
    parts = [_SEGMENT_HEADER.pack(_SEGMENT_MAGIC, len(records))]
    for record in records:
        parts.append(_U32.pack(len(record)))
        parts.append(record)
    data = b"".join(parts)
    return data + _U32.pack(zlib.crc32(data))


def _decode_segment(data: bytes, end: int, where: str) -> list[bytes]:
    """Unpack a segment holding entries [0, end); JournalCorrupt if it does not."""
    if len(data) < _SEGMENT_HEADER.size + _U32.size:
        raise JournalCorrupt(f"{where}: truncated segment ({len(data)} bytes)")
    (crc,) = _U32.unpack(data[-_U32.size :])
    if zlib.crc32(data[: -_U32.size]) != crc:
        raise JournalCorrupt(f"{where}: segment checksum mismatch; the bytes were damaged")
    magic, count = _SEGMENT_HEADER.unpack_from(data)
    if magic != _SEGMENT_MAGIC or count != end:
        raise JournalCorrupt(f"{where}: not a segment of {end} entries")
    records = []
    pos = _SEGMENT_HEADER.size
    limit = len(data) - _U32.size
    for _ in range(count):
        if pos + _U32.size > limit:
            raise JournalCorrupt(f"{where}: segment ends early")
        (size,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        if pos + size > limit:
            raise JournalCorrupt(f"{where}: segment ends early")
        records.append(data[pos : pos + size])
        pos += size
    if pos != limit:
        raise JournalCorrupt(f"{where}: trailing bytes after the last entry")
    return records


# -- errors ----------------------------------------------------------------------


class _PreconditionFailed(Exception):
    """A conditional write was refused (412). Internal: methods turn it into a conflict.

    ``retried`` says an earlier attempt of the same request may have landed,
    so the refusal may be caused by this very write.
    """

    def __init__(self, retried: bool) -> None:
        super().__init__("precondition failed")
        self.retried = retried


class _NoSuchKey(Exception):
    """The key does not exist (404). Internal: methods turn it into None or not-found."""


_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)
_DENIED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AccountProblem",
    }
)
_CREDENTIAL_ERRORS: Final = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.NoAuthTokenError,
    botocore.exceptions.TokenRetrievalError,
)
_LINK_ERRORS: Final = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ChecksumError,
    OSError,
)


@contextmanager
def _s3_errors(operation: str, bucket: str, key: str, attempt: int) -> Iterator[None]:
    """Map botocore's exceptions for one request onto journal's (and two internal ones).

    412 becomes :class:`_PreconditionFailed`, 404 on a key :class:`_NoSuchKey`;
    throttling, 5xx, 409 ConditionalRequestConflict and broken connections
    become :class:`TransientError`; a missing bucket, denied access, missing
    credentials or an unsupported feature become :class:`BackendUnavailable`.
    Messages name the operation, bucket and key, never a credential.
    """
    where = f"S3 {operation} s3://{bucket}/{key}"
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code", ""))
        status = int(meta.get("HTTPStatusCode") or 0)
        message = error.get("Message") or code or f"HTTP {status}"
        if status == 412 or code == "PreconditionFailed":
            retried = attempt > 1 or int(meta.get("RetryAttempts") or 0) > 0
            raise _PreconditionFailed(retried) from exc
        if code == "NoSuchBucket":
            raise BackendUnavailable(
                f"{where}: bucket {bucket!r} does not exist (or is in another account); "
                "create it, or fix the URL"
            ) from exc
        if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
            raise _NoSuchKey(key) from exc
        if code in _DENIED_CODES or status == 403:
            raise BackendUnavailable(
                f"{where}: access denied ({code or status}); check the credentials boto3 "
                "found (its standard chain) and the bucket policy: the engine needs "
                "GetObject, PutObject, DeleteObject and ListBucket on the prefix"
            ) from exc
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed") or status == 301:
            raise BackendUnavailable(
                f"{where}: the bucket lives in another region ({code}: {message}); "
                "pass region=<its region>"
            ) from exc
        if code == "NotImplemented" or status == 501:
            raise BackendUnavailable(
                f"{where}: the store does not implement this request ({message}); the S3 "
                "engine needs conditional writes (If-None-Match / If-Match on PutObject)"
            ) from exc
        if code in _TRANSIENT_CODES or status >= 500 or status in (409, 429):
            raise TransientError(f"{where}: {code or status}: {message}") from exc
        raise JournalError(f"{where}: the store refused the request: {code}: {message}") from exc
    except _CREDENTIAL_ERRORS as exc:
        raise BackendUnavailable(
            f"{where}: no usable AWS credentials ({type(exc).__name__}); configure them "
            "the standard boto3 way (environment, shared config/profile, instance role)"
        ) from exc
    except _LINK_ERRORS as exc:
        raise TransientError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise BackendUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc


# -- per-invocation state a client keeps ------------------------------------------


@attrs.define
class _Known:
    """What this client knows of one invocation; every byte here is authoritative.

    ``entries`` holds records read from the store or written by this client
    (create-only writes that succeeded); ``contiguous`` is the length of the
    gap-free run [0, contiguous) in it; ``segment_end`` the end of the newest
    segment known; ``loaded`` says the journal was read (or created) here.
    ``record`` is (version, etag, status) of the last record read or written.
    """

    entries: dict[int, bytes] = attrs.field(factory=dict)
    contiguous: int = 0
    segment_end: int = 0
    loaded: bool = False
    packing: bool = False
    record: tuple[int, str, InvocationStatus] | None = None

    def merge(self, records: Iterable[tuple[int, bytes]]) -> None:
        for index, data in records:
            self.entries.setdefault(index, data)
        while self.contiguous in self.entries:
            self.contiguous += 1

    def reset(self, records: Iterable[tuple[int, bytes]] = (), segment_end: int = 0) -> None:
        """Know exactly ``records`` (the whole journal as just read, or nothing)."""
        self.entries = {}
        self.contiguous = 0
        self.segment_end = segment_end
        self.merge(records)
        self.loaded = True


# -- the engine ------------------------------------------------------------------


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
        self.prefix = _check_prefix(prefix)
        self.segment_every = segment_every
        self.max_attempts = max_attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._owns_client = owns_client
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._closed = False
        self._lock = threading.Lock()
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._checked_conditional = False
        self._refused: BackendUnavailable | None = None
        self._check_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

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

    # -- keys ----------------------------------------------------------------------

    def _inv_key(self, k: str) -> str:
        return f"{self._root}inv/{k}"

    def _entries_dir(self, k: str) -> str:
        return f"{self._root}ent/{k}/"

    def _segments_dir(self, k: str) -> str:
        return f"{self._root}seg/{k}/"

    def _status_dir(self, status: InvocationStatus, k: str | None = None) -> str:
        base = f"{self._root}status/{status.value}/"
        return base if k is None else f"{base}{k}/"

    def key_of(self, invocation_id: str) -> str:
        """The key of an invocation's record (for operators and tests)."""
        return self._inv_key(encode_id(invocation_id))

    def entry_key(self, invocation_id: str, index: int) -> str:
        """The key of one entry (for operators and tests)."""
        return self._entries_dir(encode_id(invocation_id)) + _number(index)

    # -- requests ------------------------------------------------------------------

    def _request(self, operation: str, key: str, call: Callable[[], T]) -> T:
        """Make one S3 request: errors mapped, transient failures retried with backoff."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with _s3_errors(operation, self.bucket, key, attempt):
                    return call()
            except TransientError as exc:
                if attempt >= self.max_attempts:
                    raise TransientError(f"{exc} (gave up after {attempt} attempts)") from exc
                ceiling = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                log.warning("%s; attempt %d, retrying in %.3fs", exc, attempt, delay)
                self._sleep(delay)

    def _put(
        self, key: str, body: bytes, *, create_only: bool = False, if_match: str | None = None
    ) -> str:
        """PUT an object; return its ETag. Conditional when asked (see _s3_errors)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if create_only:
            params["IfNoneMatch"] = "*"
        if if_match is not None:
            params["IfMatch"] = if_match
        response = self._request("PutObject", key, lambda: self.client.put_object(**params))
        return str(response.get("ETag", ""))

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """GET an object's bytes and ETag, or None if it does not exist."""

        def call() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            # Reading the body belongs to the attempt: a broken stream is retried.
            return bytes(response["Body"].read()), str(response.get("ETag", ""))

        try:
            return self._request("GetObject", key, call)
        except _NoSuchKey:
            return None

    def _exists(self, key: str) -> bool:
        try:
            self._request(
                "HeadObject", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key)
            )
        except _NoSuchKey:
            return False
        return True

    def _delete(self, key: str) -> None:
        with suppress(_NoSuchKey):
            self._request(
                "DeleteObject",
                key,
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
            )

    def _delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            objects = {"Objects": [{"Key": key} for key in batch], "Quiet": True}
            response = self._request(
                "DeleteObjects",
                batch[0],
                lambda objects=objects: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete=objects
                ),
            )
            failed = response.get("Errors") or []
            if failed:
                first = failed[0]
                raise JournalError(
                    f"S3 DeleteObjects in s3://{self.bucket}/{self._root}: {len(failed)} "
                    f"key(s) not deleted, e.g. {first.get('Key')!r}: {first.get('Code')}"
                )

    def _list(self, prefix: str, *, start_after: str | None = None) -> list[str]:
        """The keys under ``prefix`` (after ``start_after``), in key order."""
        keys: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token is not None:
                params["ContinuationToken"] = token
            elif start_after is not None:
                params["StartAfter"] = start_after
            response = self._request(
                "ListObjectsV2",
                prefix,
                lambda params=params: self.client.list_objects_v2(**params),  # type: ignore[misc]
            )
            keys.extend(str(item["Key"]) for item in response.get("Contents") or [])
            if not response.get("IsTruncated"):
                return keys
            token = response.get("NextContinuationToken")

    def _map(self, fn: Callable[[str], T], keys: list[str]) -> list[T]:
        """``fn`` over ``keys``, a few requests in flight when there are many."""
        if len(keys) <= 2:
            return [fn(key) for key in keys]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(8, thread_name_prefix="runjournal-s3")
            pool = self._pool
        return list(pool.map(fn, keys))

    # -- checks --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(f"this S3 journal client ({self!r}) is closed")

    def _check_writable(self) -> None:
        """Refuse a store that ignores conditional writes; probe it once per client."""
        self._check_open()
        if self._checked_conditional:
            return
        with self._check_lock:
            if self._refused is not None:
                raise self._refused
            if self._checked_conditional:
                return
            members = self.client.meta.service_model.operation_model("PutObject").input_shape
            if not {"IfNoneMatch", "IfMatch"} <= set(members.members):
                self._refused = BackendUnavailable(
                    "this boto3/botocore is too old to send conditional writes "
                    "(PutObject IfNoneMatch/IfMatch); upgrade boto3"
                )
                raise self._refused
            self._probe_conditional_writes()
            self._checked_conditional = True

    def _probe_conditional_writes(self) -> None:
        """Write a fresh object twice create-only, then with a wrong ETag: both must fail."""
        key = f"{self._root}probe/{uuid.uuid4().hex}"
        ignored: str | None = None
        # The key is new: a refusal can only be our own first try, answered into a
        # dropped connection.
        with suppress(_PreconditionFailed):
            self._put(key, b"probe 1", create_only=True)
        try:
            try:
                self._put(key, b"probe 2", create_only=True)
                ignored = "If-None-Match: * (create-only)"
            except _PreconditionFailed:
                try:
                    self._put(key, b"probe 3", if_match='"runjournal-probe-not-an-etag"')
                    ignored = "If-Match: <etag> (compare-and-swap)"
                except _PreconditionFailed:
                    pass
        finally:
            self._delete(key)
        if ignored is not None:
            self._refused = BackendUnavailable(
                f"the store behind s3://{self.bucket}/{self._root} silently ignores {ignored} "
                "on PutObject; with it the journal cannot keep each step exactly once. Use a "
                "store with conditional writes (AWS S3, recent MinIO, Cloudflare R2)"
            )
            raise self._refused

    # -- the per-invocation cache --------------------------------------------------

    def _state(self, invocation_id: str, *, create: bool = True) -> _Known | None:
        """The tracked state of an invocation (call with ``self._lock`` held)."""
        known = self._known.get(invocation_id)
        if known is not None:
            self._known.move_to_end(invocation_id)
        elif create:
            known = self._known[invocation_id] = _Known()
            while len(self._known) > _STATE_LIMIT:
                self._known.popitem(last=False)
        return known

    def _remember_record(self, inv: Invocation, etag: str) -> None:
        with self._lock:
            known = self._state(inv.id)
            assert known is not None
            if known.record is not None and inv.version < known.record[0]:
                # Deleted and created again by someone else: what we knew is void.
                known.reset()
                known.loaded = False
            known.record = (inv.version, etag, inv.status)

    def _forget(self, invocation_id: str) -> None:
        with self._lock:
            self._known.pop(invocation_id, None)

    # -- invocations ---------------------------------------------------------------

    def _decode_record(self, data: bytes, invocation_id: str | None, key: str) -> Invocation:
        inv = decode_invocation(data)
        if invocation_id is not None and inv.id != invocation_id:
            raise JournalCorrupt(
                f"s3://{self.bucket}/{key} holds invocation {inv.id!r}, not {invocation_id!r}"
            )
        return inv

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        k = encode_id(invocation.id)
        key = self._inv_key(k)
        # A read first only saves writes when the id exists (a resume, or the
        # output of a finished one); creating still relies on If-None-Match.
        existing = self.get_invocation(invocation.id)
        if existing is not None:
            return existing, False
        self._check_writable()
        stored = attrs.evolve(invocation, version=1)
        body = encode_invocation(stored)
        # The marker goes first, so a pending record always has one.
        self._put(self._status_dir(stored.status, k) + _number(1), b"")
        for _ in range(3):
            try:
                etag = self._put(key, body, create_only=True)
                break
            except _PreconditionFailed as exc:
                got = self._get(key)
                if got is None:
                    continue  # deleted again since: try to create it once more
                if exc.retried and got[0] == body:
                    etag = got[1]  # our first try landed and its answer was lost
                    break
                current = self._decode_record(got[0], invocation.id, key)
                self._remember_record(current, got[1])
                return current, False
        else:
            raise TransientError(
                f"invocation {invocation.id!r} was created and deleted by others while this "
                "client tried to create it; try again"
            )
        self._remember_record(stored, etag)
        with self._lock:
            known = self._state(stored.id)
            assert known is not None
            # A new invocation has no entries: what this client appends is all there is.
            known.reset()
        return stored, True

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        self._check_open()
        key = self._inv_key(encode_id(invocation_id))
        got = self._get(key)
        if got is None:
            return None
        inv = self._decode_record(got[0], invocation_id, key)
        self._remember_record(inv, got[1])
        return inv

    def update_invocation(self, invocation: Invocation) -> Invocation:
        self._check_writable()
        k = encode_id(invocation.id)
        key = self._inv_key(k)
        with self._lock:
            known = self._state(invocation.id, create=False)
            record = known.record if known is not None else None
        if record is None or record[0] != invocation.version:
            got = self._get(key)
            if got is None:
                raise InvocationNotFound(invocation.id)
            current = self._decode_record(got[0], invocation.id, key)
            self._remember_record(current, got[1])
            if current.version != invocation.version:
                raise VersionConflict(invocation.id, invocation.version, current.version)
            record = (current.version, got[1], current.status)
        _, etag, old_status = record
        stored = attrs.evolve(invocation, version=invocation.version + 1)
        body = encode_invocation(stored)
        # Marker first (see create_invocation); a loser's marker is filtered
        # out when listing, since listing checks the record itself.
        self._put(self._status_dir(stored.status, k) + _number(stored.version), b"")
        try:
            new_etag = self._put(key, body, if_match=etag)
        except _NoSuchKey:
            raise InvocationNotFound(invocation.id) from None
        except _PreconditionFailed as exc:
            got = self._get(key)
            if got is None:
                raise InvocationNotFound(invocation.id) from exc
            if not (exc.retried and got[0] == body):
                current = self._decode_record(got[0], invocation.id, key)
                self._remember_record(current, got[1])
                raise VersionConflict(invocation.id, invocation.version, current.version) from exc
            new_etag = got[1]  # our first try landed and its answer was lost
        self._remember_record(stored, new_etag)
        try:
            self._delete(self._status_dir(old_status, k) + _number(invocation.version))
        except JournalError as exc:  # the update stands; listing skips a stale marker
            log.warning("invocation %r: stale status marker left: %s", invocation.id, exc)
        if stored.status is not InvocationStatus.PENDING:
            self._pack(stored.id, k, final=True)
        return stored

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        self._check_open()
        if status is None:
            root = f"{self._root}inv/"
            segments = [key[len(root) :] for key in self._list(root)]
            found = self._map(self._id_of_segment, segments)
            return iter(sorted(i for i in found if i is not None))
        # Markers may be stale (a crash between steps, a lost CAS race): each
        # candidate's record has the last word, and no entry key is read.
        base = self._status_dir(status)
        candidates = sorted({key[len(base) :].split("/", 1)[0] for key in self._list(base)})

        def current(k: str) -> str | None:
            key = self._inv_key(k)
            got = self._get(key)
            if got is None:
                return None
            inv = self._decode_record(got[0], decode_id(k), key)
            return inv.id if inv.status is status else None

        return iter(sorted(i for i in self._map(current, candidates) if i is not None))

    def _id_of_segment(self, k: str) -> str | None:
        invocation_id = decode_id(k)
        if invocation_id is not None:
            return invocation_id
        key = self._inv_key(k)
        got = self._get(key)
        if got is None:  # deleted since it was listed
            return None
        inv = self._decode_record(got[0], None, key)
        if encode_id(inv.id) != k:
            raise JournalCorrupt(f"s3://{self.bucket}/{key} holds invocation {inv.id!r}")
        return inv.id

    def delete_invocation(self, invocation_id: str) -> bool:
        self._check_writable()
        k = encode_id(invocation_id)
        key = self._inv_key(k)
        existed = self._exists(key)
        doomed = self._list(self._entries_dir(k)) + self._list(self._segments_dir(k))
        for status in InvocationStatus:
            doomed += self._list(self._status_dir(status, k))
        # The record goes last: an interrupted delete leaves a record whose
        # journal is partly gone (delete it again), never entries a new
        # invocation under the same id would replay.
        self._delete_many(doomed)
        self._forget(invocation_id)
        if existed:
            self._delete(key)
        return existed

    # -- entries -------------------------------------------------------------------

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        self._check_writable()
        k = encode_id(invocation_id)
        key = self._entries_dir(k) + _number(entry.index)
        body = encode_entry(entry)
        try:
            self._put(key, body, create_only=True)
        except _PreconditionFailed as exc:
            # After a retry the object may be our own first try, answered into
            # a dropped connection: the same bytes mean the step is recorded.
            got = self._get(key) if exc.retried else None
            if got is None or got[0] != body:
                raise EntryConflict(invocation_id, entry.index) from exc
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            known.merge([(entry.index, body)])
            due = known.contiguous - known.segment_end >= self.segment_every
        if due:
            self._pack(invocation_id, k, final=False)

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
            got = self._get(segment_key)
            if got is not None:
                where = f"s3://{self.bucket}/{segment_key}"
                records = list(enumerate(_decode_segment(got[0], newest, where)))
                covered = newest
                break
            # Superseded by a newer segment and removed since it was listed: look again.
        directory = self._entries_dir(k)
        first_loose = max(start, covered)
        after = directory + _number(first_loose - 1) if first_loose > 0 else None
        loose_keys = self._list(directory, start_after=after)
        for key, data in zip(loose_keys, self._map(self._get_entry, loose_keys), strict=True):
            if data is not None:  # None: deleted since it was listed
                records.append((int(key[len(directory) :]), data))
        entries = []
        for index, data in records:
            entry = decode_entry(data)
            if entry.index != index:
                raise JournalCorrupt(
                    f"invocation {invocation_id!r}: the entry stored at index {index} "
                    f"says it is index {entry.index}"
                )
            if index >= start:
                entries.append(entry)
        with self._lock:
            known = self._state(invocation_id)
            assert known is not None
            if start == 0:
                known.reset(records, newest)  # the store has the last word
            else:
                known.merge(records)
                known.segment_end = max(known.segment_end, newest)
        return entries

    def _get_entry(self, key: str) -> bytes | None:
        got = self._get(key)
        return None if got is None else got[0]

    def _latest_segment(self, k: str) -> tuple[int, str | None]:
        directory = self._segments_dir(k)
        keys = self._list(directory)
        if not keys:
            return 0, None
        best = max(keys, key=lambda key: int(key[len(directory) :]))
        return int(best[len(directory) :]), best

    def _pack(self, invocation_id: str, k: str, *, final: bool) -> None:
        """Write entries [0, n) as one segment, if this client knows a longer run.

        Only an optimisation: failures are logged, never raised, since the
        entries themselves are already durable.
        """
        try:
            if final:
                with self._lock:
                    known = self._state(invocation_id, create=False)
                if known is None or not known.loaded:
                    # Its journal was not read here: read it once, which also
                    # finds the newest segment.
                    self.read_entries(invocation_id)
            with self._lock:
                known = self._state(invocation_id, create=False)
                if known is None or known.packing or known.contiguous <= known.segment_end:
                    return
                end, previous = known.contiguous, known.segment_end
                records = [known.entries[i] for i in range(end)]
                known.packing = True
            try:
                body = _encode_segment(records)
                if len(body) <= MAX_SEGMENT_BYTES:
                    # A refusal means another client packed the same run: same bytes.
                    with suppress(_PreconditionFailed):
                        self._put(self._segments_dir(k) + _number(end), body, create_only=True)
                    if previous:
                        self._delete(self._segments_dir(k) + _number(previous))
                with self._lock:
                    known.segment_end = max(known.segment_end, end)
            finally:
                with self._lock:
                    known.packing = False
            if final:
                self._forget(invocation_id)
        except JournalError as exc:
            log.warning("invocation %r: could not pack its entries: %s", invocation_id, exc)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
            self._known.clear()
        if pool is not None:
            pool.shutdown(wait=True)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> S3Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return f"S3Backend(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={endpoint!r})"
