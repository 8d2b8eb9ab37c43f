"""The request layer: one boto3 client and bucket, errors mapped, transient failures retried.

Every S3 request of the engine goes through :class:`S3Requests`, which
raises only :mod:`runjournal.journal` errors and the two internal signals of
:mod:`._errors` (a refused conditional write, a missing key).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

from runjournal.backends.s3._errors import NoSuchKey, PreconditionFailed, s3_errors
from runjournal.backends.s3._keys import KeyLayout
from runjournal.journal import BackendUnavailable, JournalError, TransientError

__all__ = ["S3Requests", "retry_delay"]

log = logging.getLogger("runjournal.s3")

T = TypeVar("T")

#: Keys per DeleteObjects request (S3's limit).
_DELETE_BATCH = 1000
#: Requests in flight when :meth:`S3Requests.map` has many keys.
_POOL_SIZE = 8


def retry_delay(attempt: int, backoff: float, max_backoff: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): doubling, capped, half jittered."""
    ceiling = min(max_backoff, backoff * 2.0 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class S3Requests:
    """Makes the engine's S3 requests on one bucket. Thread-safe.

    Args:
        client: a boto3 S3 client, best without retries of its own.
        bucket: the bucket.
        layout: the key names under the engine's prefix (for the probe's key
            and messages).
        max_attempts: tries per request when the store fails transiently.
        backoff: the first retry delay in seconds (doubles, with jitter).
        max_backoff: the longest retry delay.
        sleep: how retries wait (tests pass a fake).
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        layout: KeyLayout,
        *,
        max_attempts: int = 6,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.client = client
        self.bucket = bucket
        self.layout = layout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._checked_conditional = False
        self._refused: BackendUnavailable | None = None
        self._check_lock = threading.Lock()

    def request(self, operation: str, key: str, call: Callable[[], T]) -> T:
        """Make one S3 request: errors mapped, transient failures retried with backoff."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with s3_errors(operation, self.bucket, key, attempt):
                    return call()
            except TransientError as exc:
                if attempt >= self.max_attempts:
                    raise TransientError(f"{exc} (gave up after {attempt} attempts)") from exc
                delay = retry_delay(attempt, self.backoff, self.max_backoff)
                log.warning("%s; attempt %d, retrying in %.3fs", exc, attempt, delay)
                self._sleep(delay)

    def put(
        self, key: str, body: bytes, *, create_only: bool = False, if_match: str | None = None
    ) -> str:
        """PUT an object; return its ETag.

        Raises:
            PreconditionFailed: ``create_only`` and the key exists, or
                ``if_match`` and the object's ETag differs.
            NoSuchKey: ``if_match`` and the key does not exist.
        """
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if create_only:
            params["IfNoneMatch"] = "*"
        if if_match is not None:
            params["IfMatch"] = if_match
        response = self.request("PutObject", key, lambda: self.client.put_object(**params))
        return str(response.get("ETag", ""))

    def get(self, key: str) -> tuple[bytes, str] | None:
        """GET an object's bytes and ETag, or None if it does not exist."""

        def call() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            # Reading the body belongs to the attempt: a broken stream is retried.
            return bytes(response["Body"].read()), str(response.get("ETag", ""))

        try:
            return self.request("GetObject", key, call)
        except NoSuchKey:
            return None

    def get_bytes(self, key: str) -> bytes | None:
        """GET an object's bytes, or None if it does not exist."""
        got = self.get(key)
        return None if got is None else got[0]

    def exists(self, key: str) -> bool:
        """HEAD an object: whether it exists."""
        try:
            self.request(
                "HeadObject", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key)
            )
        except NoSuchKey:
            return False
        return True

    def delete(self, key: str) -> None:
        """DELETE an object; a missing one is not an error."""
        with suppress(NoSuchKey):
            self.request(
                "DeleteObject",
                key,
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
            )

    def delete_many(self, keys: list[str]) -> None:
        """DELETE objects, a thousand per request.

        Raises:
            JournalError: the store refused to delete some of them.
        """
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            objects = {"Objects": [{"Key": key} for key in batch], "Quiet": True}
            response = self.request(
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
                    f"S3 DeleteObjects in s3://{self.bucket}/{self.layout.root}: {len(failed)} "
                    f"key(s) not deleted, e.g. {first.get('Key')!r}: {first.get('Code')}"
                )

    def list_keys(self, prefix: str, *, start_after: str | None = None) -> list[str]:
        """The keys under ``prefix`` (after ``start_after``), in key order."""
        keys: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token is not None:
                params["ContinuationToken"] = token
            elif start_after is not None:
                params["StartAfter"] = start_after
            response = self.request(
                "ListObjectsV2",
                prefix,
                lambda params=params: self.client.list_objects_v2(**params),  # type: ignore[misc]
            )
            keys.extend(str(item["Key"]) for item in response.get("Contents") or [])
            if not response.get("IsTruncated"):
                return keys
            token = response.get("NextContinuationToken")

    def map(self, fn: Callable[[str], T], keys: list[str]) -> list[T]:
        """``fn`` over ``keys``, a few requests in flight when there are many."""
        if len(keys) <= 2:
            return [fn(key) for key in keys]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_POOL_SIZE, thread_name_prefix="runjournal-s3")
            pool = self._pool
        return list(pool.map(fn, keys))

    # -- conditional writes ----------------------------------------------------------

    def require_conditional_writes(self) -> None:
        """Refuse a store that ignores conditional writes; probe it once per client.

        Raises:
            BackendUnavailable: botocore cannot send them, or the store ignores them
                (every later call raises the same error).
        """
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
            ignored = self.probe_conditional_writes()
            if ignored is not None:
                self._refused = BackendUnavailable(
                    f"the store behind s3://{self.bucket}/{self.layout.root} silently ignores "
                    f"{ignored} on PutObject; with it the journal cannot keep each step exactly "
                    "once. Use a store with conditional writes (AWS S3, recent MinIO, "
                    "Cloudflare R2)"
                )
                raise self._refused
            self._checked_conditional = True

    def probe_conditional_writes(self) -> str | None:
        """Write a fresh object twice create-only, then with a wrong ETag: both must fail.

        Returns:
            None if the store refused both, else the header it ignored.
        """
        key = self.layout.probe()
        # The key is new: a refusal can only be our own first try, answered into a
        # dropped connection.
        with suppress(PreconditionFailed):
            self.put(key, b"probe 1", create_only=True)
        try:
            try:
                self.put(key, b"probe 2", create_only=True)
            except PreconditionFailed:
                pass
            else:
                return "If-None-Match: * (create-only)"
            try:
                self.put(key, b"probe 3", if_match='"runjournal-probe-not-an-etag"')
            except PreconditionFailed:
                return None
            return "If-Match: <etag> (compare-and-swap)"
        finally:
            self.delete(key)

    def close(self) -> None:
        """Stop the pool of :meth:`map` (the client is the caller's)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
