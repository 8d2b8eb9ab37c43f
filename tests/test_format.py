"""The shared record format: round-trips, and damage always means JournalCorrupt."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runjournal.journal import (
    Entry,
    EntryKind,
    Failure,
    Invocation,
    InvocationStatus,
    JournalCorrupt,
    Lease,
    StepProgress,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
)
from runjournal.journal._format import _CRC, MAGIC

texts = st.text(max_size=40)
failures = st.none() | st.builds(Failure, texts, texts)
floats = st.floats(allow_nan=False, allow_infinity=False)

entries = st.builds(
    Entry,
    index=st.integers(0, 2**40),
    kind=st.sampled_from(list(EntryKind)),
    name=st.none() | texts,
    payload=st.none() | st.binary(max_size=200),
    codec=texts,
    failure=failures,
    created_at=floats,
    attempts=st.integers(0, 10_000),
)
invocations = st.builds(
    Invocation,
    id=texts.filter(bool),
    handler=texts.filter(bool),
    input=st.binary(max_size=200),
    codec=texts,
    status=st.sampled_from(list(InvocationStatus)),
    output=st.none() | st.binary(max_size=200),
    failure=failures,
    created_at=floats,
    updated_at=floats,
    version=st.integers(0, 2**40),
    lease=st.none() | st.builds(Lease, texts, st.integers(0, 2**40), st.integers(0, 2**40), floats),
    steps=st.lists(
        st.builds(
            StepProgress,
            index=st.integers(0, 2**40),
            attempts=st.integers(0, 10_000),
            first_started_at=floats,
            in_flight=st.booleans(),
            last_error=failures,
        ),
        max_size=4,
        unique_by=lambda step: step.index,
    ).map(lambda steps: sorted(steps, key=lambda step: step.index)),
)


@given(entries, st.none() | texts)
def test_entry_round_trips(entry: Entry, invocation_id: str | None) -> None:
    assert decode_entry(encode_entry(entry, invocation_id), invocation_id) == entry
    assert decode_entry(encode_entry(entry, invocation_id)) == entry


def test_an_entry_read_under_another_invocation_is_corrupt() -> None:
    data = encode_entry(Entry(3, EntryKind.RUN, "s", b"1", "json"), "inv-024")
    assert decode_entry(data, "inv-024").index == 3
    with pytest.raises(JournalCorrupt, match=r"index 3 was written for another invocation"):
        decode_entry(data, "inv-424")


@given(invocations)
def test_invocation_round_trips(inv: Invocation) -> None:
    assert decode_invocation(encode_invocation(inv)) == inv


def _decoders() -> list[Any]:
    return [decode_entry, decode_invocation]


@pytest.mark.parametrize("decode", _decoders())
@given(data=st.binary(max_size=300))
def test_random_bytes_are_corrupt(decode: Any, data: bytes) -> None:
    with pytest.raises(JournalCorrupt):
        decode(data)


@given(entry=entries, cut=st.integers(min_value=1))
def test_truncated_entry_is_corrupt(entry: Entry, cut: int) -> None:
    data = encode_entry(entry)
    with pytest.raises(JournalCorrupt):
        decode_entry(data[: len(data) - 1 - cut % len(data)])


@given(inv=invocations, position=st.integers(min_value=0), bit=st.integers(0, 7))
def test_flipped_bit_in_invocation_is_corrupt(inv: Invocation, position: int, bit: int) -> None:
    data = bytearray(encode_invocation(inv))
    data[position % len(data)] ^= 1 << bit
    with pytest.raises(JournalCorrupt):
        decode_invocation(bytes(data))


@given(entry=entries, position=st.integers(min_value=0), bit=st.integers(0, 7))
def test_flipped_bit_in_entry_is_corrupt(entry: Entry, position: int, bit: int) -> None:
    data = bytearray(encode_entry(entry))
    data[position % len(data)] ^= 1 << bit
    with pytest.raises(JournalCorrupt):
        decode_entry(bytes(data))


def _framed(kind: bytes, body: Any, version: int = 1) -> bytes:
    import zlib

    data = MAGIC + bytes([version]) + kind + msgpack.packb(body, use_bin_type=True)
    return data + _CRC.pack(zlib.crc32(data))


@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=10),
        max_leaves=20,
    )
)
def test_well_framed_garbage_bodies_are_corrupt(body: Any) -> None:
    """A valid checksum over a body of the wrong shape is still corrupt."""
    with pytest.raises(JournalCorrupt):
        decode_entry(_framed(b"E", body))
    with pytest.raises(JournalCorrupt):
        decode_invocation(_framed(b"I", body))


def test_wrong_types_in_right_shape_are_corrupt() -> None:
    good = [0, "run", None, b"x", "json", None, 1.0, 1]  # format 1
    assert decode_entry(_framed(b"E", good)).index == 0
    for slot, bad in [(0, -1), (0, True), (1, "nope"), (3, "text"), (5, ["a"]), (7, 1.5)]:
        body = list(good)
        body[slot] = bad
        with pytest.raises(JournalCorrupt):
            decode_entry(_framed(b"E", body))


def test_errors_say_what_is_wrong() -> None:
    data = encode_entry(Entry(0, EntryKind.RUN, "s", b"1", "json"))
    with pytest.raises(JournalCorrupt, match="format version 9 is not supported"):
        decode_entry(data[:2] + b"\x09" + data[3:])
    with pytest.raises(JournalCorrupt, match="record type"):
        decode_invocation(data)
    with pytest.raises(JournalCorrupt, match="checksum"):
        decode_entry(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(JournalCorrupt, match="expected bytes"):
        decode_entry("text")  # type: ignore[arg-type]


# -- version 1, as runjournal 0.1 wrote it -------------------------------------------

# Bytes read out of a journal written by runjournal 0.1 (tests/data/v1-lmdb holds it whole).
V1_PENDING = bytes.fromhex(
    "524a01499aad6f726465722d70656e64696e67ae6f72646572732e70726f63657373c4147b226964223a"
    "322c2273746f70223a747275657da46a736f6ea770656e64696e67c0c0cb41dac19689ab45f1cb41dac1"
    "9689ab45f1018e6e08aa"
)
V1_ENTRY = bytes.fromhex(
    "524a01459800a372756ea772657365727665c40c2272657365727665642d3222a46a736f6ec0cb41dac1"
    "9689ab5434014d93b9ff"
)
V1_FAILED = bytes.fromhex(
    "524a01499aad726566756e642d6661696c6564ad6f72646572732e726566756e64c4087b226964223a33"
    "7da46a736f6ea66661696c6564c092d92872756e6a6f75726e616c2e636f6e746578742e5f6572726f72"
    "733a5465726d696e616c4572726f72ae726566756e642072656675736564cb41dac19689ab9066cb41da"
    "c19689abb93802d4770ed9"
)


def test_version_1_records_still_decode() -> None:
    pending = decode_invocation(V1_PENDING)
    assert (pending.id, pending.handler, pending.status) == (
        "order-pending",
        "orders.process",
        InvocationStatus.PENDING,
    )
    assert pending.input == b'{"id":2,"stop":true}' and pending.version == 1
    assert pending.lease is None and pending.steps == ()
    entry = decode_entry(V1_ENTRY, "order-pending")  # no binding to check in version 1
    assert (entry.index, entry.name, entry.payload) == (0, "reserve", b'"reserved-2"')
    failed = decode_invocation(V1_FAILED)
    assert failed.status is InvocationStatus.FAILED and failed.failure is not None
    assert failed.failure.message == "refund refused"


def test_a_version_1_record_is_written_back_as_version_2() -> None:
    pending = decode_invocation(V1_PENDING)
    again = encode_invocation(pending)
    assert again[2] == 2 and decode_invocation(again) == pending


def test_version_1_records_are_still_checked() -> None:
    with pytest.raises(JournalCorrupt, match="checksum"):
        decode_invocation(V1_PENDING[:10] + bytes([V1_PENDING[10] ^ 4]) + V1_PENDING[11:])
    with pytest.raises(JournalCorrupt, match="12 fields|10 fields|expected"):
        decode_invocation(_framed(b"I", [1] * 12, version=1))


def test_bad_leases_and_steps_are_corrupt() -> None:
    base = encode_invocation(Invocation(id="x", handler="h", input=b"", codec="json"))
    body = msgpack.unpackb(base[4:-4], raw=False)
    for slot, bad in [
        (10, ["w", 1, 2]),
        (10, ["w", "1", 2, 3.0]),
        (11, [[0, 1, 2.0, 2, None]]),
        (11, [[1, 1, 2.0, 0, None], [0, 1, 2.0, 0, None]]),
        (11, [[0, 1, 2.0, 0]]),
        (11, "steps"),
    ]:
        broken = list(body)
        broken[slot] = bad
        with pytest.raises(JournalCorrupt):
            decode_invocation(_framed(b"I", broken, version=2))
