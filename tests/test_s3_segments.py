"""The S3 engine's segment format, alone: round trips, and every damage is JournalCorrupt."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runjournal.backends.s3._segments import decode_segment, encode_segment
from runjournal.journal import JournalCorrupt, encode_entry
from runjournal.journal.testing import make_entry

WHERE = "s3://bucket/seg/k/3"
records_lists = st.lists(st.binary(max_size=64), max_size=20)


def _records(n: int) -> list[bytes]:
    return [encode_entry(make_entry(i, f'"{i}"'.encode())) for i in range(n)]


def _with_crc(body: bytes) -> bytes:
    """``body`` (a segment without its CRC) with a CRC that matches: damage past the checksum."""
    return body + struct.pack(">I", zlib.crc32(body))


def _body(segment: bytes) -> bytes:
    return segment[:-4]


@given(records=records_lists)
@settings(max_examples=200)
def test_round_trip(records: list[bytes]) -> None:
    assert decode_segment(encode_segment(records), len(records), WHERE) == records


def test_round_trip_of_entry_records() -> None:
    records = _records(5)
    assert decode_segment(encode_segment(records), 5, WHERE) == records


def test_layout_is_magic_count_framed_records_crc() -> None:
    data = encode_segment([b"ab", b""])
    assert data[:4] == b"RJS1"
    assert data[4:12] == (2).to_bytes(8, "big")
    assert data[12:22] == b"\x00\x00\x00\x02ab\x00\x00\x00\x00"
    assert data[22:] == struct.pack(">I", zlib.crc32(data[:22]))


@given(records=records_lists.filter(bool), data=st.data())
@settings(max_examples=200)
def test_any_flipped_bit_is_corrupt(records: list[bytes], data: st.DataObject) -> None:
    segment = bytearray(encode_segment(records))
    position = data.draw(st.integers(0, len(segment) - 1))
    segment[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(JournalCorrupt, match="s3://bucket/seg/k/3"):
        decode_segment(bytes(segment), len(records), WHERE)


def test_every_truncation_is_corrupt() -> None:
    segment = encode_segment(_records(3))
    for size in range(len(segment)):
        with pytest.raises(JournalCorrupt, match=WHERE):
            decode_segment(segment[:size], 3, WHERE)


def test_too_short_to_be_a_segment() -> None:
    with pytest.raises(JournalCorrupt, match=r"truncated segment \(15 bytes\)"):
        decode_segment(b"\x00" * 15, 0, WHERE)


def test_extra_bytes_after_the_crc_are_corrupt() -> None:
    with pytest.raises(JournalCorrupt, match="checksum"):
        decode_segment(encode_segment(_records(2)) + b"\x00", 2, WHERE)


def test_a_segment_of_another_length_than_its_key_says() -> None:
    segment = encode_segment(_records(3))
    for end in (0, 2, 4):
        with pytest.raises(JournalCorrupt, match=f"not a segment of {end} entries"):
            decode_segment(segment, end, WHERE)


def test_wrong_magic_with_a_matching_crc() -> None:
    body = b"RJS2" + _body(encode_segment(_records(1)))[4:]
    with pytest.raises(JournalCorrupt, match="not a segment of 1 entries"):
        decode_segment(_with_crc(body), 1, WHERE)


def test_a_record_running_past_the_end_with_a_matching_crc() -> None:
    body = bytearray(_body(encode_segment([b"abc"])))
    body[12:16] = struct.pack(">I", 4)  # says 4 bytes, 3 follow
    with pytest.raises(JournalCorrupt, match="segment ends early"):
        decode_segment(_with_crc(bytes(body)), 1, WHERE)


def test_a_length_cut_off_with_a_matching_crc() -> None:
    # The header promises two records; the second one's length is only 2 bytes long.
    body = _body(encode_segment([b"abc"]))
    body = body[:4] + (2).to_bytes(8, "big") + body[12:] + b"\x00\x00"
    with pytest.raises(JournalCorrupt, match="segment ends early"):
        decode_segment(_with_crc(body), 2, WHERE)


def test_fewer_records_than_the_header_says_with_a_matching_crc() -> None:
    body = _body(encode_segment([b"abc"]))
    body = body[:4] + (2).to_bytes(8, "big") + body[12:]
    with pytest.raises(JournalCorrupt, match="segment ends early"):
        decode_segment(_with_crc(body), 2, WHERE)


def test_trailing_bytes_after_the_last_record_with_a_matching_crc() -> None:
    body = _body(encode_segment([b"abc"])) + b"\x00"
    with pytest.raises(JournalCorrupt, match="trailing bytes"):
        decode_segment(_with_crc(body), 1, WHERE)
