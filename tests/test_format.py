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
)


@given(entries)
def test_entry_round_trips(entry: Entry) -> None:
    assert decode_entry(encode_entry(entry)) == entry


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
    good = [0, "run", None, b"x", "json", None, 1.0, 1]
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
