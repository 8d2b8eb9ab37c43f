"""What an S3 client knows of its invocations, alone: the bounded cache. No server."""

from __future__ import annotations

import threading

import pytest

from runjournal.backends.s3._known import KnownInvocations, KnownRecord
from runjournal.journal import InvocationStatus

PENDING = InvocationStatus.PENDING


def record(version: int = 1, etag: str = '"e1"') -> KnownRecord:
    return KnownRecord(version, etag, PENDING)


def test_an_invocation_is_known_to_exist_once_its_record_was_seen() -> None:
    known = KnownInvocations()
    assert not known.exists("a") and known.record("a") is None
    known.remember_record("a", record())
    assert known.exists("a") and known.record("a") == record()
    known.confirm_exists("b")  # a check found it: no record, but it exists
    assert known.exists("b") and known.record("b") is None
    known.forget("a")
    assert not known.exists("a") and known.record("a") is None


def test_reading_entries_does_not_say_the_invocation_exists() -> None:
    known = KnownInvocations()
    known.read("a", [], 0, whole=True)
    assert known.is_loaded("a")
    assert not known.exists("a")


def test_the_least_recently_used_are_forgotten() -> None:
    known = KnownInvocations(limit=2)
    known.remember_record("a", record())
    known.remember_record("b", record())
    assert known.exists("a")  # touches "a": "b" is now the oldest
    known.remember_record("c", record())
    assert len(known) == 2
    assert known.exists("a") and known.exists("c")
    assert not known.exists("b")


def test_a_created_invocation_is_loaded_and_empty() -> None:
    known = KnownInvocations()
    known.created("a", record())
    assert known.is_loaded("a") and known.exists("a")
    assert known.begin_pack("a") is None  # nothing to pack


def test_appends_count_the_unpacked_gap_free_run() -> None:
    known = KnownInvocations()
    known.created("a", record())
    assert known.add_entry("a", 0, b"0") == 1
    assert known.add_entry("a", 2, b"2") == 1  # a gap at 1: the run is still [0, 1)
    assert known.add_entry("a", 1, b"1") == 3
    assert known.add_entry("a", 1, b"other") == 3  # the first bytes stay


def test_packing_claims_the_run_once_and_moves_the_segment_end() -> None:
    known = KnownInvocations()
    known.created("a", record())
    for index in range(3):
        known.add_entry("a", index, str(index).encode())
    job = known.begin_pack("a")
    assert job is not None
    assert (job.end, job.previous, job.records) == (3, 0, [b"0", b"1", b"2"])
    assert known.begin_pack("a") is None  # claimed
    known.end_pack(job, packed=True)
    assert known.add_entry("a", 3, b"3") == 1
    job = known.begin_pack("a")
    assert job is not None and (job.end, job.previous) == (4, 3)
    known.end_pack(job, packed=False)  # failed: the run is still unpacked
    assert known.add_entry("a", 4, b"4") == 2


def test_a_whole_read_replaces_and_a_partial_one_merges() -> None:
    known = KnownInvocations()
    known.created("a", record())
    known.add_entry("a", 0, b"mine")
    known.read("a", [(0, b"store"), (1, b"store")], 0, whole=True)
    job = known.begin_pack("a")
    assert job is not None and job.records == [b"store", b"store"]
    known.end_pack(job, packed=True)
    known.read("a", [(2, b"x"), (3, b"x")], 4, whole=False)
    assert known.begin_pack("a") is None  # [0, 4) is packed already


def test_an_older_record_voids_the_entries_known() -> None:
    known = KnownInvocations()
    known.created("a", record(version=3))
    known.add_entry("a", 0, b"old")
    known.remember_record("a", record(version=1))  # deleted and created again elsewhere
    assert not known.is_loaded("a")
    assert known.begin_pack("a") is None
    assert known.record("a") == record(version=1)


def test_releasing_the_entries_keeps_the_record() -> None:
    known = KnownInvocations()
    known.created("a", record())
    known.add_entry("a", 0, b"0")
    known.release_entries("a")
    assert known.exists("a") and known.record("a") == record()
    assert not known.is_loaded("a")
    assert known.begin_pack("a") is None


def test_clear_forgets_everything() -> None:
    known = KnownInvocations()
    known.remember_record("a", record())
    known.clear()
    assert len(known) == 0 and not known.exists("a")


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        KnownInvocations(limit=0)


def test_appends_from_many_threads() -> None:
    known = KnownInvocations()
    known.created("a", record())
    barrier = threading.Barrier(8)

    def append(first: int) -> None:
        barrier.wait()
        for index in range(first, 800, 8):
            known.add_entry("a", index, b"x")

    threads = [threading.Thread(target=append, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert known.add_entry("a", 800, b"x") == 801
