"""The S3 engine against a moto server over HTTP on 127.0.0.1.

The server (runjournal.backends.s3.testing) is started once per session; each
test works under a prefix of its own in a shared bucket. The pure pieces are
tested alone in test_s3_keys, test_s3_segments, test_s3_errors, test_s3_known
and test_s3_requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import botocore.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runjournal.backends import open_backend
from runjournal.backends.s3 import MAX_PREFIX_BYTES, S3Backend
from runjournal.backends.s3.testing import (
    Faults,
    MotoS3,
    RequestCounter,
    error_response,
    strip_conditional_headers,
)
from runjournal.context import Context, Runtime
from runjournal.journal import (
    BackendUnavailable,
    EntryConflict,
    InvocationNotFound,
    InvocationStatus,
    JournalBackend,
    JournalCorrupt,
    JournalError,
    TransientError,
    VersionConflict,
)
from runjournal.journal.testing import (
    AWKWARD_IDS,
    JournalBackendTests,
    Opener,
    make_entry,
    make_invocation,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


class Sleeps(list[float]):
    """Records the engine's retry delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


Open = Callable[..., S3Backend]


@pytest.fixture
def opener(moto: MotoS3, bucket: str, prefix: str, sleeps: Sleeps) -> Iterator[Open]:
    """Opens a new engine client, with its own boto3 client, on this test's prefix."""
    opened: list[S3Backend] = []

    def open_(client: Any = None, **kwargs: Any) -> S3Backend:
        backend = S3Backend(
            client if client is not None else moto.client(),
            bucket,
            prefix,
            sleep=sleeps,
            owns_client=True,
            **kwargs,
        )
        opened.append(backend)
        return backend

    yield open_
    for backend in opened:
        backend.close()


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _corrupt(backend: S3Backend, key: str) -> None:
    body = backend.client.get_object(Bucket=backend.bucket, Key=key)["Body"].read()
    backend.client.put_object(Bucket=backend.bucket, Key=key, Body=_flip_last_byte(body))


def _keys(backend: S3Backend, under: str = "") -> list[str]:
    root = f"{backend.prefix}/{under}"
    pages = backend.client.get_paginator("list_objects_v2").paginate(
        Bucket=backend.bucket, Prefix=root
    )
    return [
        item["Key"][len(backend.prefix) + 1 :]
        for page in pages
        for item in page.get("Contents", [])
    ]


class TestS3Backend(JournalBackendTests):
    @pytest.fixture
    def open_backend(self, opener: Open) -> Opener:
        return opener

    def corrupt_entry(self, backend: JournalBackend, invocation_id: str, index: int) -> None:
        assert isinstance(backend, S3Backend)
        _corrupt(backend, backend.entry_key(invocation_id, index))

    def corrupt_invocation(self, backend: JournalBackend, invocation_id: str) -> None:
        assert isinstance(backend, S3Backend)
        _corrupt(backend, backend.key_of(invocation_id))


class TestS3BackendPackingEveryTwo(TestS3Backend):
    """The kit again with a segment every two entries, so packing meets every rule."""

    @pytest.fixture
    def open_backend(self, opener: Open) -> Opener:
        return lambda: opener(segment_every=2)


# -- configuration -----------------------------------------------------------------


def test_open_backend_url_with_query_options(moto: MotoS3, bucket: str, prefix: str) -> None:
    url = f"s3://{bucket}/{prefix}?endpoint_url={moto.endpoint_url}&region=us-east-1"
    backend = open_backend(url, segment_every="7", max_attempts="3")
    try:
        assert isinstance(backend, S3Backend)
        assert (backend.bucket, backend.prefix) == (bucket, prefix)
        assert (backend.segment_every, backend.max_attempts) == (7, 3)
        caps = backend.capabilities
        assert caps.persistent and caps.max_payload_bytes
        backend.create_invocation(make_invocation("via-url"))
        assert list(backend.list_invocations()) == ["via-url"]
    finally:
        backend.close()


def test_unknown_option_names_option_and_engine() -> None:
    with pytest.raises(TypeError, match=r"s3:// engine .* does not take the option 'map_size'"):
        open_backend("s3://bucket/p", map_size="1GB")
    with pytest.raises(TypeError, match="aws_secret_access_key"):
        open_backend("s3://bucket/p?aws_secret_access_key=hunter2")


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        ("s3://bucket/p", {"segment_every": "1"}, "segment_every"),
        ("s3://bucket/p", {"max_attempts": "many"}, "max_attempts"),
        ("s3://bucket/p", {"read_timeout": "-1"}, "read_timeout"),
        ("s3://bucket/p", {"addressing_style": "sideways"}, "addressing_style"),
        ("s3://key:secret@bucket/p", {}, "credentials"),
        ("s3:///p", {}, "no bucket"),
        ("memory://x", {}, "not an s3"),
        ("s3://bucket/a/../b", {}, r"'\.\.'"),
        ("s3://bucket/a//b", {}, "empty"),
        ("s3://bucket/" + "p" * (MAX_PREFIX_BYTES + 1), {}, "longer than"),
    ],
)
def test_malformed_urls_and_options_are_refused(
    url: str, options: dict[str, str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        S3Backend.from_url(url, **options)


def test_the_secret_never_shows(moto: MotoS3, bucket: str) -> None:
    backend = S3Backend.from_url(f"s3://{bucket}/x", endpoint_url=moto.endpoint_url)
    try:
        assert "testing" not in repr(backend)
    finally:
        backend.close()


# -- keys (the pure encoding is tested in test_s3_keys.py) -----------------------------

# Awkward ids for the round trip through a real server.
ids = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=400) | st.sampled_from(
    [*AWKWARD_IDS, "~", "~~", "~41", "A", ".", "x" * 600, "é" * 300, "a/" * 300]
)


@given(inv_ids=st.lists(ids.filter(lambda s: "\x00" not in s), min_size=1, max_size=4, unique=True))
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_ids_round_trip_through_s3(moto: MotoS3, bucket: str, inv_ids: list[str]) -> None:
    backend = S3Backend(moto.client(), bucket, f"h-{uuid.uuid4().hex[:12]}", owns_client=True)
    with backend:
        for n, inv_id in enumerate(inv_ids):
            backend.create_invocation(make_invocation(inv_id))
            backend.append_entry(inv_id, make_entry(0, str(n).encode()))
        assert list(backend.list_invocations()) == sorted(inv_ids)
        assert list(backend.list_invocations(InvocationStatus.PENDING)) == sorted(inv_ids)
        for n, inv_id in enumerate(inv_ids):
            assert [e.payload for e in backend.read_entries(inv_id)] == [str(n).encode()]


def test_key_layout(opener: Open) -> None:
    backend = opener(segment_every=2)
    stored, _ = backend.create_invocation(make_invocation("order/42"))
    for index in range(3):
        backend.append_entry("order/42", make_entry(index))
    backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
    assert sorted(_keys(backend)) == [
        "ent/order~2F42/00000000000000000000",
        "ent/order~2F42/00000000000000000001",
        "ent/order~2F42/00000000000000000002",
        "inv/order~2F42",
        "seg/order~2F42/00000000000000000003",
        "status/completed/order~2F42/00000000000000000002",
    ]


# -- races between clients ------------------------------------------------------------


def _together(*calls: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_create_only_race_between_two_clients(opener: Open) -> None:
    a, b = opener(), opener()
    a.create_invocation(make_invocation("raced"))
    for index in range(20):
        results = _together(
            lambda i=index: a.append_entry("raced", make_entry(i, b'"a"')),
            lambda i=index: b.append_entry("raced", make_entry(i, b'"b"')),
        )
        won = [name for name, r in zip("ab", results, strict=True) if r is None]
        lost = [r for r in results if isinstance(r, EntryConflict)]
        assert len(won) == 1 and len(lost) == 1, results
        assert a.read_entries("raced", start=index)[0].payload == f'"{won[0]}"'.encode()
    assert [e.index for e in b.read_entries("raced")] == list(range(20))


def test_cas_race_between_two_clients(opener: Open) -> None:
    a, b = opener(), opener()
    a.create_invocation(make_invocation("cas"))
    for round_ in range(15):
        current = a.get_invocation("cas")
        assert current is not None and current.version == round_ + 1
        results = _together(
            lambda c=current: a.update_invocation(attrs.evolve(c, output=b"a")),
            lambda c=current: b.update_invocation(attrs.evolve(c, output=b"b")),
        )
        wins = [r for r in results if not isinstance(r, Exception)]
        assert len(wins) == 1 and isinstance(results[results.index(wins[0]) ^ 1], VersionConflict)
        assert b.get_invocation("cas") == wins[0]
    assert list(a.list_invocations(InvocationStatus.PENDING)) == ["cas"]


def test_append_at_an_index_a_segment_covers_still_conflicts(opener: Open) -> None:
    writer = opener(segment_every=4)
    writer.create_invocation(make_invocation("packed"))
    for index in range(9):
        writer.append_entry("packed", make_entry(index))
    assert [k for k in _keys(writer, "seg/")] == ["seg/packed/00000000000000000008"]
    late = opener(segment_every=4)  # a worker that never read this journal
    for index in (0, 3, 7, 8):
        with pytest.raises(EntryConflict):
            late.append_entry("packed", make_entry(index, b'"late"'))
    late.append_entry("packed", make_entry(9, b'"nine"'))
    entries = opener().read_entries("packed")
    assert [e.index for e in entries] == list(range(10))
    assert [e.payload for e in entries] == [b'"ok"'] * 9 + [b'"nine"']


def test_a_segment_never_covers_a_gap(opener: Open) -> None:
    writer = opener(segment_every=2)
    writer.create_invocation(make_invocation("gappy"))
    for index in (0, 1, 3, 4, 5):  # index 2 is still running somewhere
        writer.append_entry("gappy", make_entry(index))
    assert _keys(writer, "seg/") == ["seg/gappy/00000000000000000002"]
    opener().append_entry("gappy", make_entry(2, b'"two"'))  # it lands later
    assert [e.index for e in opener().read_entries("gappy")] == [0, 1, 2, 3, 4, 5]
    writer.read_entries("gappy")  # now the writer knows index 2 too
    writer.append_entry("gappy", make_entry(6))
    assert _keys(writer, "seg/") == ["seg/gappy/00000000000000000007"]
    assert [e.payload for e in opener().read_entries("gappy")][1:4] == [b'"ok"', b'"two"', b'"ok"']


def test_a_journal_deleted_and_created_again_elsewhere_is_read_afresh(opener: Open) -> None:
    a, b = opener(segment_every=2), opener(segment_every=2)
    a.create_invocation(make_invocation("reborn"))
    for index in range(3):
        a.append_entry("reborn", make_entry(index, b'"old"'))
    assert b.delete_invocation("reborn")
    b.create_invocation(make_invocation("reborn"))
    b.append_entry("reborn", make_entry(0, b'"new"'))
    assert [e.payload for e in a.read_entries("reborn")] == [b'"new"']
    a.append_entry("reborn", make_entry(1, b'"a"'))  # packs [0, 2) from what it read
    assert _keys(a, "seg/") == ["seg/reborn/00000000000000000002"]
    assert [e.payload for e in opener().read_entries("reborn")] == [b'"new"', b'"a"']


# -- a crash, and another process finishing the work -----------------------------------

CRASHY_WORKER = """
import json, os, sys
from runjournal.backends.s3 import S3Backend
from runjournal.context import Context, Runtime

bucket, prefix, endpoint, effects, crash_at, mode = sys.argv[1:]
backend = S3Backend.from_url(
    f"s3://{bucket}/{prefix}", endpoint_url=endpoint, region="us-east-1", segment_every="4"
)
rt = Runtime(backend)

@rt.handler("crashy")
def crashy(ctx: Context, n: int) -> int:
    total = 0
    for i in range(n):
        def step(i: int = i) -> int:
            if i == int(crash_at):
                os._exit(17)  # dies between two steps: nothing flushed, nothing cleaned up
            with open(effects, "a") as f:
                f.write(f"{i}\\n")
            return i * i
        total += ctx.run(step, name=f"step-{i}")
    return total

if mode == "invoke":
    print(json.dumps(rt.invoke("crashy", 10, invocation_id="order-1")))
else:
    print(json.dumps([[r.invocation_id, r.status.value, r.output] for r in rt.recover()]))
backend.close()
"""


def test_a_crashed_invocation_is_finished_by_another_process(
    moto: MotoS3, bucket: str, prefix: str, tmp_path: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(CRASHY_WORKER)
    effects = tmp_path / "effects.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def worker(crash_at: int, mode: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(script), bucket, prefix, moto.endpoint_url, str(effects)]
        return subprocess.run(
            [*argv, str(crash_at), mode], env=env, capture_output=True, text=True, timeout=120
        )

    first = worker(crash_at=7, mode="invoke")
    assert first.returncode == 17, first.stderr
    assert effects.read_text().split() == [str(i) for i in range(7)]

    second = worker(crash_at=-1, mode="recover")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == [["order-1", "completed", sum(i * i for i in range(10))]]
    # Steps 0-6 were not run again; 7-9 ran once.
    assert effects.read_text().split() == [str(i) for i in range(10)]

    backend = S3Backend(moto.client(), bucket, prefix)
    stored = backend.get_invocation("order-1")
    assert stored is not None and stored.status is InvocationStatus.COMPLETED
    assert [e.index for e in backend.read_entries("order-1")] == list(range(10))


# -- faults ------------------------------------------------------------------------------


def _is_entry_put(request: Any) -> bool:
    return "/ent/" in request.url


@pytest.mark.parametrize("fault", ["500", "503", "409", "drop", "lost"])
def test_appends_survive_a_fault_on_every_request(
    opener: Open, sleeps: Sleeps, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = opener()
    backend.create_invocation(make_invocation("faulty"))
    faults = Faults(backend.client, when=_is_entry_put)
    for index in range(8):
        faults.add(fault, fault if index % 2 else None)  # one or two failures, then through
        backend.append_entry("faulty", make_entry(index, f'"{index}"'.encode()))
    assert faults.injected[fault] == 12
    assert len(sleeps) == 12 and all(0 < s <= 2.0 for s in sleeps)
    retries = [r for r in caplog.records if r.name == "runjournal.s3"]
    assert len(retries) == 12 and "testing" not in caplog.text  # logged, with no secret
    entries = opener().read_entries("faulty")
    assert [e.payload for e in entries] == [f'"{i}"'.encode() for i in range(8)]
    # Exactly one object per index: nothing was duplicated anywhere.
    assert len(_keys(backend, "ent/")) == 8


def test_a_lost_answer_is_not_mistaken_for_a_conflict_but_a_real_one_is(opener: Open) -> None:
    backend = opener()
    backend.create_invocation(make_invocation("lost"))
    faults = Faults(backend.client, when=_is_entry_put)
    faults.add("lost")
    backend.append_entry("lost", make_entry(0, b'"mine"'))  # landed, answer lost, retried: 412
    faults.add("lost")
    with pytest.raises(EntryConflict):  # a different value is a real conflict, lost answer or not
        backend.append_entry("lost", make_entry(0, b'"other"'))
    assert [e.payload for e in opener().read_entries("lost")] == [b'"mine"']


def test_lost_answers_on_create_and_compare_and_swap(opener: Open) -> None:
    backend = opener()
    faults = Faults(backend.client, when=lambda request: "/inv/" in request.url)
    faults.add("lost")
    stored, created = backend.create_invocation(make_invocation("cas-lost"))
    assert created and stored.version == 1
    faults.add("lost")
    done = backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
    assert done.version == 2
    assert opener().get_invocation("cas-lost") == done
    assert faults.injected["lost"] == 2


def test_a_runtime_under_faults_runs_every_step_once(opener: Open) -> None:
    backend = opener(segment_every=5)
    faults = Faults(backend.client, when=lambda request: True)
    rt = Runtime(backend)
    effects: list[int] = []

    @rt.handler("busy")
    def busy(ctx: Context, n: int) -> list[int]:
        return [ctx.run(lambda i=i: effects.append(i) or i, name=f"s{i}") for i in range(n)]

    plan = ["500", None, "lost", "503", None, "drop", None, "409", None, None]
    faults.add(*(plan * 5))
    assert rt.invoke("busy", 20, invocation_id="busy-1") == list(range(20))
    assert effects == list(range(20))
    assert sum(faults.injected.values()) == 25 and not faults.plan
    # One entry per step, each the value its step returned: nothing lost, nothing twice.
    entries = opener().read_entries("busy-1")
    assert [(e.index, e.payload) for e in entries] == [(i, str(i).encode()) for i in range(20)]
    assert len(_keys(backend, "ent/")) == 20
    # Resumed elsewhere, it runs nothing.
    again = Runtime(opener())
    again.handler("busy")(busy)
    assert again.invoke("busy", 20, invocation_id="busy-1") == list(range(20))
    assert effects == list(range(20))


def test_transient_failures_give_up_after_max_attempts(opener: Open, sleeps: Sleeps) -> None:
    backend = opener(max_attempts=3)
    backend.create_invocation(make_invocation("hopeless"))
    faults = Faults(backend.client, when=_is_entry_put).add("503", "503", "503")
    with pytest.raises(TransientError, match=r"SlowDown.*gave up after 3 attempts") as info:
        backend.append_entry("hopeless", make_entry(0))
    assert isinstance(info.value.__cause__, TransientError)
    assert len(sleeps) == 2 and faults.injected["503"] == 3
    backend.append_entry("hopeless", make_entry(0))  # the store is back: it goes through
    assert [e.index for e in backend.read_entries("hopeless")] == [0]


def test_reads_survive_dropped_connections(opener: Open) -> None:
    writer = opener(segment_every=3)
    writer.create_invocation(make_invocation("reread"))
    for index in range(7):
        writer.append_entry("reread", make_entry(index))
    reader = opener()
    Faults(reader.client, "GetObject").add("drop", "500", None, "drop")
    Faults(reader.client, "ListObjectsV2").add("503", None, "drop")
    assert [e.index for e in reader.read_entries("reread")] == list(range(7))


# -- errors that are not retried ---------------------------------------------------------


def test_missing_bucket_is_a_clear_error_and_not_retried(moto: MotoS3, sleeps: Sleeps) -> None:
    counter = RequestCounter()
    backend = S3Backend(counter.attach(moto.client()), "no-such-bucket-here", sleep=sleeps)
    with pytest.raises(BackendUnavailable, match="bucket 'no-such-bucket-here' does not exist"):
        backend.create_invocation(make_invocation())
    with pytest.raises(BackendUnavailable, match="does not exist"):
        backend.append_entry("x", make_entry(0))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        list(backend.list_invocations())
    assert counter.snapshot() == {"GetObject": 1, "PutObject": 1, "ListObjectsV2": 1}
    assert not sleeps


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId"])
def test_access_denied_is_a_clear_error_and_not_retried(
    opener: Open, sleeps: Sleeps, code: str
) -> None:
    backend = opener()
    backend.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: error_response(request.url, 403, code)
    )
    with pytest.raises(BackendUnavailable, match="access denied") as info:
        backend.get_invocation("x")
    assert "testing" not in str(info.value)  # no credential in the message
    assert not sleeps


def test_callers_never_see_botocore_exceptions(opener: Open) -> None:
    backend = opener(max_attempts=2)
    Faults(backend.client, "GetObject").add(*["drop"] * 2)
    Faults(backend.client, "ListObjectsV2").add(*["500"] * 2)
    for call in (lambda: backend.get_invocation("x"), lambda: backend.read_entries("x")):
        with pytest.raises(JournalError) as info:
            call()
        assert not isinstance(info.value, botocore.exceptions.BotoCoreError)
        assert not isinstance(info.value, botocore.exceptions.ClientError)


# -- a store that ignores conditional writes --------------------------------------------


def test_a_store_ignoring_conditional_headers_is_refused(opener: Open) -> None:
    backend = opener()
    strip_conditional_headers(backend.client)
    with pytest.raises(BackendUnavailable, match=r"silently ignores If-None-Match"):
        backend.create_invocation(make_invocation("never"))
    with pytest.raises(BackendUnavailable, match="silently ignores"):
        backend.append_entry("never", make_entry(0))
    assert _keys(backend) == []  # nothing written, the probe cleaned up after itself
    assert backend.get_invocation("never") is None  # reading is still allowed


def test_a_store_ignoring_only_if_match_is_refused(opener: Open) -> None:
    backend = opener()

    def strip_if_match(request: Any, **_: Any) -> None:
        if "If-Match" in request.headers:
            del request.headers["If-Match"]

    backend.client.meta.events.register("before-sign.s3.PutObject", strip_if_match)
    with pytest.raises(BackendUnavailable, match=r"If-Match"):
        backend.create_invocation(make_invocation())


def test_the_conditional_write_probe_runs_once_per_client(opener: Open) -> None:
    counter = RequestCounter()
    backend = opener()
    counter.attach(backend.client)
    backend.create_invocation(make_invocation("p"))
    for index in range(3):
        backend.append_entry("p", make_entry(index))
    probes = counter.snapshot()
    # 3 probe PUTs + 1 probe DELETE, then 2 PUTs to create and one per entry.
    assert probes["PutObject"] == 3 + 2 + 3 and probes["DeleteObject"] == 1


# -- cost ----------------------------------------------------------------------------------


def _steps_runtime(backend: S3Backend) -> Runtime:
    rt = Runtime(backend)

    @rt.handler("steps")
    def steps(ctx: Context, n: int) -> int:
        for i in range(n):
            ctx.run(lambda i=i: i, name="s")
        return n

    return rt


def _run_steps(backend: S3Backend, inv_id: str, n: int) -> None:
    assert _steps_runtime(backend).invoke("steps", n, invocation_id=inv_id) == n


def test_one_put_per_step(opener: Open) -> None:
    counter = RequestCounter()
    backend = opener(segment_every=50)
    counter.attach(backend.client)
    backend.create_invocation(make_invocation("warm-up"))  # the probe, once per client
    counter.reset()
    _run_steps(backend, "w1", 200)
    counts = counter.snapshot()
    # 200 entries, 4 segments (every 50, the last one at completion), create
    # (marker, record), complete (marker, record).
    assert counts["PutObject"] == 200 + 4 + 2 + 2
    assert counts.get("GetObject", 0) == 1  # create looks for an existing record once
    assert counter.total <= 200 + 4 + 4 + 1 + 3 + 2 + 4  # + LISTs of the first read, deletes


def test_an_update_that_keeps_the_status_is_one_put(opener: Open) -> None:
    """Leases and step progress rewrite a pending record often (a worker's heartbeat
    renews one record every third of its lease): each such update is one PUT."""
    counter = RequestCounter()
    backend = opener()
    counter.attach(backend.client)
    stored, _ = backend.create_invocation(make_invocation("inv"))
    counter.reset()
    for n in range(5):
        stored = backend.update_invocation(attrs.evolve(stored, updated_at=float(n)))
    assert counter.snapshot() == {"PutObject": 5}
    counter.reset()
    done = backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
    counts = counter.snapshot()
    # the new marker, the record, the old marker deleted (its version known), then
    # the final pack: the journal is read once (2 LISTs) and has no entries to pack.
    assert (counts["PutObject"], counts["DeleteObject"]) == (2, 1)
    assert list(backend.list_invocations(InvocationStatus.PENDING)) == []
    assert list(backend.list_invocations(InvocationStatus.COMPLETED)) == ["inv"]
    assert done.version == 7


def test_a_status_change_by_a_client_that_only_read_the_record_clears_the_old_marker(
    opener: Open,
) -> None:
    first = opener()
    stored, _ = first.create_invocation(make_invocation("inv"))
    stored = first.update_invocation(attrs.evolve(stored, updated_at=2.0))
    second = opener()
    current = second.get_invocation("inv")
    assert current is not None
    second.update_invocation(attrs.evolve(current, status=InvocationStatus.FAILED))
    for status in (InvocationStatus.PENDING, InvocationStatus.COMPLETED):
        assert list(second.list_invocations(status)) == []
    assert list(second.list_invocations(InvocationStatus.FAILED)) == ["inv"]
    keys = second.client.list_objects_v2(Bucket=second.bucket, Prefix=second.prefix + "/status/")
    assert [item["Key"].rsplit("/", 3)[1] for item in keys.get("Contents", [])] == ["failed"]


def test_appends_check_that_the_invocation_exists_once_per_client(
    opener: Open, moto: MotoS3
) -> None:
    counter = RequestCounter()
    writer = opener(counter.attach(moto.client()))
    writer.create_invocation(make_invocation("warm-up"))  # the probe, once per client
    counter.reset()
    # A 10-step invocation this client creates: one PUT per step, no check.
    writer.create_invocation(make_invocation("ten"))
    assert counter.snapshot() == {"GetObject": 1, "PutObject": 2}
    counter.reset()
    for index in range(10):
        writer.append_entry("ten", make_entry(index))
    assert counter.snapshot() == {"PutObject": 10}
    # A client that never read it pays one HEAD of the record, on its first append only.
    other = opener(counter.attach(moto.client()))
    other.create_invocation(make_invocation("warm-up-2"))
    counter.reset()
    for index in range(10, 20):
        other.append_entry("ten", make_entry(index))
    assert counter.snapshot() == {"HeadObject": 1, "PutObject": 10}
    # A client that read the record first pays nothing more.
    reader = opener(counter.attach(moto.client()))
    reader.create_invocation(make_invocation("warm-up-3"))
    assert reader.get_invocation("ten") is not None
    counter.reset()
    for index in range(20, 25):
        reader.append_entry("ten", make_entry(index))
    assert counter.snapshot() == {"PutObject": 5}


def test_a_runtime_pays_no_check_for_the_invocations_it_creates(opener: Open) -> None:
    counter = RequestCounter()
    backend = opener()
    counter.attach(backend.client)
    backend.create_invocation(make_invocation("warm-up"))  # the probe, once per client
    costs = []
    for n in (10, 20):
        counter.reset()
        _run_steps(backend, f"steps-{n}", n)
        costs.append(counter.snapshot())
    assert all("HeadObject" not in cost for cost in costs)
    # Ten more steps cost ten PUTs and nothing else: one request per step.
    extra = {op: costs[1].get(op, 0) - costs[0].get(op, 0) for op in {*costs[0], *costs[1]}}
    assert {op: n for op, n in extra.items() if n} == {"PutObject": 10}


def test_an_append_to_a_missing_invocation_writes_nothing(opener: Open) -> None:
    backend = opener()
    with pytest.raises(InvocationNotFound):
        backend.append_entry("ghost", make_entry(0))
    with pytest.raises(InvocationNotFound):  # not remembered as existing: checked again
        backend.append_entry("ghost", make_entry(1))
    assert _keys(backend, "ent/") == []
    backend.create_invocation(make_invocation("ghost"))
    backend.append_entry("ghost", make_entry(0))
    assert [e.index for e in opener().read_entries("ghost")] == [0]


def test_an_append_after_this_client_deleted_the_invocation_raises(opener: Open) -> None:
    backend = opener(segment_every=2)
    backend.create_invocation(make_invocation("gone"))
    for index in range(3):
        backend.append_entry("gone", make_entry(index))
    assert backend.delete_invocation("gone")
    with pytest.raises(InvocationNotFound):
        backend.append_entry("gone", make_entry(3))
    assert _keys(backend) == []


def test_a_finished_invocation_stays_known(opener: Open, moto: MotoS3) -> None:
    counter = RequestCounter()
    backend = opener(counter.attach(moto.client()))
    stored, _ = backend.create_invocation(make_invocation("done"))
    backend.append_entry("done", make_entry(0))
    backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
    counter.reset()
    # Its entries were dropped after the final pack; that it exists was not.
    backend.append_entry("done", make_entry(1))
    assert counter.snapshot() == {"PutObject": 1}


def test_a_delete_by_another_client_goes_unnoticed_by_a_client_that_knows(opener: Open) -> None:
    """The documented limitation: checking on every append would cost a request per step."""
    writer, deleter = opener(), opener()
    writer.create_invocation(make_invocation("running"))
    writer.append_entry("running", make_entry(0))
    assert deleter.delete_invocation("running")
    writer.append_entry("running", make_entry(1))  # lands, under a record that is gone
    assert opener().get_invocation("running") is None
    with pytest.raises(InvocationNotFound):
        deleter.append_entry("running", make_entry(2))


def test_replay_of_a_completed_200_step_journal_reads_3_objects(opener: Open, moto: MotoS3) -> None:
    _run_steps(opener(), "done", 200)
    counter = RequestCounter()
    reader = opener(counter.attach(moto.client()))
    entries = reader.read_entries("done")
    assert [e.index for e in entries] == list(range(200))
    assert counter.snapshot() == {"ListObjectsV2": 2, "GetObject": 1}
    counter.reset()
    assert _steps_runtime(reader).invoke("steps", 200, invocation_id="done") == 200
    assert counter.snapshot() == {"GetObject": 1}


def test_replay_of_a_running_journal_reads_entries_since_the_last_segment(
    opener: Open, moto: MotoS3
) -> None:
    writer = opener(segment_every=50)
    writer.create_invocation(make_invocation("running"))
    for index in range(130):
        writer.append_entry("running", make_entry(index))
    counter = RequestCounter()
    reader = opener(counter.attach(moto.client()))
    assert [e.index for e in reader.read_entries("running")] == list(range(130))
    # The segment of 100 entries, then the 30 written since.
    assert counter.snapshot() == {"ListObjectsV2": 2, "GetObject": 1 + 30}
    counter.reset()
    assert [e.index for e in reader.read_entries("running", start=120)] == list(range(120, 130))
    assert counter.snapshot() == {"ListObjectsV2": 2, "GetObject": 10}  # no segment needed


def test_listing_by_status_reads_no_entry_keys(opener: Open) -> None:
    backend = opener()
    for n in range(6):
        stored, _ = backend.create_invocation(make_invocation(f"inv-{n}"))
        for index in range(5):
            backend.append_entry(stored.id, make_entry(index))
        if n % 2:
            backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
    listed: list[str] = []
    backend.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2",
        lambda params, **_: listed.append(params["Prefix"]),
    )
    assert list(backend.list_invocations(InvocationStatus.PENDING)) == ["inv-0", "inv-2", "inv-4"]
    assert list(backend.list_invocations(InvocationStatus.COMPLETED)) == ["inv-1", "inv-3", "inv-5"]
    assert listed == [f"{backend.prefix}/status/pending/", f"{backend.prefix}/status/completed/"]


def test_stale_status_markers_are_not_listed(opener: Open) -> None:
    backend = opener()
    stored, _ = backend.create_invocation(make_invocation("stale"))
    # What a crash between a marker and its record, or a lost CAS race, leaves behind.
    for key in (
        "status/completed/stale/00000000000000000002",
        "status/failed/ghost/00000000000000000001",
    ):
        backend.client.put_object(Bucket=backend.bucket, Key=f"{backend.prefix}/{key}", Body=b"")
    assert list(backend.list_invocations(InvocationStatus.COMPLETED)) == []
    assert list(backend.list_invocations(InvocationStatus.FAILED)) == []
    assert list(backend.list_invocations(InvocationStatus.PENDING)) == ["stale"]
    backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
    assert list(backend.list_invocations(InvocationStatus.COMPLETED)) == ["stale"]
    assert list(backend.list_invocations(InvocationStatus.PENDING)) == []


def test_a_damaged_segment_raises_journal_corrupt(opener: Open) -> None:
    backend = opener(segment_every=2)
    backend.create_invocation(make_invocation("seg"))
    for index in range(3):
        backend.append_entry("seg", make_entry(index))
    (segment,) = _keys(backend, "seg/")
    _corrupt(backend, f"{backend.prefix}/{segment}")
    with pytest.raises(JournalCorrupt, match="segment"):
        opener().read_entries("seg")
