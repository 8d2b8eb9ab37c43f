"""The S3 engine's request layer, alone, against an in-memory fake of the boto3 client."""

from __future__ import annotations

import collections
import hashlib
import io
import threading
from types import SimpleNamespace
from typing import Any

import botocore.exceptions
import pytest

from runjournal.backends.s3._errors import PreconditionFailed
from runjournal.backends.s3._keys import KeyLayout
from runjournal.backends.s3._requests import S3Requests, retry_delay
from runjournal.journal import BackendUnavailable, JournalError, TransientError


def _error(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, operation)


class FakeS3:
    """The few S3 calls the engine makes, on a dict, with conditional writes.

    ``fail`` queues exceptions raised by the next calls of one operation.
    """

    def __init__(self, *, if_none_match: bool = True, if_match: bool = True, page: int = 2):
        self.objects: dict[str, bytes] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail: dict[str, collections.deque[Exception]] = collections.defaultdict(
            collections.deque
        )
        self.if_none_match = if_none_match
        self.if_match = if_match
        self.page = page
        self.lock = threading.Lock()
        members = {"IfNoneMatch": None, "IfMatch": None}
        model = SimpleNamespace(input_shape=SimpleNamespace(members=members))
        self.meta = SimpleNamespace(
            service_model=SimpleNamespace(operation_model=lambda name: model)
        )

    def _enter(self, operation: str) -> None:
        with self.lock:
            self.calls[operation] += 1
            if self.fail[operation]:
                raise self.fail[operation].popleft()

    @staticmethod
    def etag(body: bytes) -> str:
        return f'"{hashlib.md5(body).hexdigest()}"'

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **cond: str) -> dict[str, Any]:
        self._enter("PutObject")
        current = self.objects.get(Key)
        if self.if_none_match and "IfNoneMatch" in cond and current is not None:
            raise _error("PreconditionFailed", 412, "PutObject")
        if self.if_match and "IfMatch" in cond:
            if current is None:
                raise _error("NoSuchKey", 404, "PutObject")
            if self.etag(current) != cond["IfMatch"]:
                raise _error("PreconditionFailed", 412, "PutObject")
        self.objects[Key] = Body
        return {"ETag": self.etag(Body)}

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._enter("GetObject")
        if Key not in self.objects:
            raise _error("NoSuchKey", 404, "GetObject")
        body = self.objects[Key]
        return {"Body": io.BytesIO(body), "ETag": self.etag(body)}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._enter("HeadObject")
        if Key not in self.objects:
            raise _error("404", 404, "HeadObject")
        return {"ETag": self.etag(self.objects[Key])}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self._enter("DeleteObject")
        self.objects.pop(Key, None)
        return {}

    def delete_objects(self, *, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
        self._enter("DeleteObjects")
        assert len(Delete["Objects"]) <= 1000
        errors = []
        for item in Delete["Objects"]:
            if item["Key"].endswith("locked"):
                errors.append({"Key": item["Key"], "Code": "AccessDenied"})
            else:
                self.objects.pop(item["Key"], None)
        return {"Errors": errors} if errors else {}

    def list_objects_v2(self, **params: Any) -> dict[str, Any]:
        self._enter("ListObjectsV2")
        assert not ("StartAfter" in params and "ContinuationToken" in params)
        after = params.get("ContinuationToken") or params.get("StartAfter") or ""
        keys = sorted(k for k in self.objects if k.startswith(params["Prefix"]) and k > after)
        page = keys[: self.page]
        out: dict[str, Any] = {"Contents": [{"Key": k} for k in page]}
        if len(keys) > self.page:
            out.update(IsTruncated=True, NextContinuationToken=page[-1])
        return out


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def requests(client: FakeS3, **kwargs: Any) -> tuple[S3Requests, Sleeps]:
    sleeps = Sleeps()
    return S3Requests(client, "bucket", KeyLayout.under("p"), sleep=sleeps, **kwargs), sleeps


def test_retry_delays_double_up_to_the_cap_with_half_jitter() -> None:
    for attempt, ceiling in [(1, 0.05), (2, 0.1), (3, 0.2), (10, 2.0), (60, 2.0)]:
        for _ in range(50):
            assert ceiling / 2 <= retry_delay(attempt, 0.05, 2.0) <= ceiling


def test_transient_failures_are_retried_then_go_through() -> None:
    client = FakeS3()
    client.fail["PutObject"].extend(
        [
            _error("SlowDown", 503, "PutObject"),
            botocore.exceptions.ConnectionClosedError(endpoint_url="http://fake"),
        ]
    )
    req, sleeps = requests(client)
    assert req.put("p/k", b"v") == FakeS3.etag(b"v")
    assert client.calls["PutObject"] == 3
    assert len(sleeps) == 2 and 0.025 <= sleeps[0] <= 0.05 and 0.05 <= sleeps[1] <= 0.1


def test_transient_failures_give_up_after_max_attempts() -> None:
    client = FakeS3()
    client.fail["GetObject"].extend(_error("InternalError", 500, "GetObject") for _ in range(3))
    req, sleeps = requests(client, max_attempts=3)
    with pytest.raises(TransientError, match="gave up after 3 attempts") as info:
        req.get("p/k")
    assert isinstance(info.value.__cause__, TransientError)
    assert client.calls["GetObject"] == 3 and len(sleeps) == 2


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_error("AccessDenied", 403, "GetObject"), BackendUnavailable),
        (_error("NoSuchBucket", 404, "GetObject"), BackendUnavailable),
        (_error("InvalidArgument", 400, "GetObject"), JournalError),
    ],
)
def test_other_failures_are_not_retried(error: Exception, expected: type[Exception]) -> None:
    client = FakeS3()
    client.fail["GetObject"].append(error)
    req, sleeps = requests(client)
    with pytest.raises(expected):
        req.get("p/k")
    assert client.calls["GetObject"] == 1 and not sleeps


def test_a_refused_conditional_write_after_a_retry_says_so() -> None:
    client = FakeS3()
    req, _ = requests(client)
    req.put("p/k", b"v", create_only=True)
    with pytest.raises(PreconditionFailed) as first:
        req.put("p/k", b"v", create_only=True)
    assert not first.value.retried
    client.fail["PutObject"].append(_error("SlowDown", 503, "PutObject"))
    with pytest.raises(PreconditionFailed) as second:
        req.put("p/k", b"v", create_only=True)
    assert second.value.retried


def test_objects_put_get_exist_and_delete() -> None:
    client = FakeS3()
    req, _ = requests(client)
    assert req.get("p/k") is None and req.get_bytes("p/k") is None
    assert not req.exists("p/k")
    etag = req.put("p/k", b"one")
    assert req.get("p/k") == (b"one", etag)
    assert req.exists("p/k")
    with pytest.raises(PreconditionFailed):
        req.put("p/k", b"two", if_match='"not-it"')
    req.put("p/k", b"two", if_match=etag)
    assert req.get_bytes("p/k") == b"two"
    req.delete("p/k")
    req.delete("p/k")  # a missing key is not an error
    assert not req.exists("p/k")


def test_listing_follows_pages_and_starts_after_a_key() -> None:
    client = FakeS3(page=2)
    client.objects = {f"p/ent/k/{i}": b"" for i in range(5)} | {"p/other": b""}
    req, _ = requests(client)
    assert req.list_keys("p/ent/k/") == [f"p/ent/k/{i}" for i in range(5)]
    assert client.calls["ListObjectsV2"] == 3
    assert req.list_keys("p/ent/k/", start_after="p/ent/k/1") == [
        "p/ent/k/2",
        "p/ent/k/3",
        "p/ent/k/4",
    ]
    assert req.list_keys("p/none/") == []


def test_delete_many_batches_by_a_thousand_and_reports_refusals() -> None:
    client = FakeS3()
    client.objects = {f"p/{i:05d}": b"" for i in range(2500)}
    req, _ = requests(client)
    req.delete_many(sorted(client.objects))
    assert client.objects == {} and client.calls["DeleteObjects"] == 3
    req.delete_many([])
    assert client.calls["DeleteObjects"] == 3
    client.objects = {"p/a": b"", "p/locked": b""}
    with pytest.raises(JournalError, match=r"1 key\(s\) not deleted, e.g. 'p/locked'"):
        req.delete_many(["p/a", "p/locked"])


def test_map_keeps_the_order() -> None:
    req, _ = requests(FakeS3())
    keys = [str(i) for i in range(50)]
    assert req.map(lambda key: int(key) * 2, keys) == [i * 2 for i in range(50)]
    assert req.map(int, ["1", "2"]) == [1, 2]
    req.close()
    assert req.map(int, ["1", "2", "3"]) == [1, 2, 3]  # a new pool after close
    req.close()


def test_a_store_with_conditional_writes_passes_the_probe_once() -> None:
    client = FakeS3()
    req, _ = requests(client)
    assert req.probe_conditional_writes() is None
    assert client.objects == {}  # the probe cleans up
    client.calls.clear()
    req.require_conditional_writes()
    req.require_conditional_writes()
    assert client.calls == {"PutObject": 3, "DeleteObject": 1}


@pytest.mark.parametrize(
    ("honoured", "ignored"),
    [
        ({"if_none_match": False}, "If-None-Match"),
        ({"if_match": False}, "If-Match"),
    ],
)
def test_a_store_ignoring_conditional_writes_is_refused_for_good(
    honoured: dict[str, bool], ignored: str
) -> None:
    client = FakeS3(**honoured)
    req, _ = requests(client)
    with pytest.raises(BackendUnavailable, match=f"silently ignores {ignored}") as first:
        req.require_conditional_writes()
    assert client.objects == {}
    client.calls.clear()
    with pytest.raises(BackendUnavailable) as again:
        req.require_conditional_writes()
    assert again.value is first.value and not client.calls  # not probed again


def test_a_botocore_without_conditional_writes_is_refused() -> None:
    client = FakeS3()
    model = SimpleNamespace(input_shape=SimpleNamespace(members={"Body": None}))
    client.meta = SimpleNamespace(service_model=SimpleNamespace(operation_model=lambda _: model))
    req, _ = requests(client)
    with pytest.raises(BackendUnavailable, match="upgrade boto3"):
        req.require_conditional_writes()
    assert not client.calls


def test_max_attempts_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        requests(FakeS3(), max_attempts=0)
