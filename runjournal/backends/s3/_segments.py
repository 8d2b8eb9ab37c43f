"""The segment format: entry records [0, end) packed into one object. Pure.

A segment is ``magic | end | (length | record)* | CRC-32`` (big-endian; the
magic is ``RJS1``, ``end`` 8 bytes, lengths and the CRC 4). The records are
the entries' own encoded bytes, each with its own checksum; the segment's CRC
covers the framing.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from runjournal.journal import JournalCorrupt

__all__ = ["MAX_SEGMENT_BYTES", "decode_segment", "encode_segment"]

#: A segment is not written past this size (replay then reads entries one by one).
MAX_SEGMENT_BYTES: Final = 64 * 1024 * 1024

_MAGIC: Final = b"RJS1"
_U32: Final = struct.Struct(">I")
_HEADER: Final = struct.Struct(">4sQ")


def encode_segment(records: list[bytes]) -> bytes:
    """Pack entry records [0, len(records)) into one segment."""
    parts = [_HEADER.pack(_MAGIC, len(records))]
    for record in records:
        parts.append(_U32.pack(len(record)))
        parts.append(record)
    data = b"".join(parts)
    return data + _U32.pack(zlib.crc32(data))


def decode_segment(data: bytes, end: int, where: str) -> list[bytes]:
    """Unpack a segment that must hold entries [0, end).

    Args:
        data: the segment's bytes.
        end: how many records its key says it holds.
        where: names the object in error messages.

    Raises:
        JournalCorrupt: truncated, damaged, of another length, or not a segment.
    """
    if len(data) < _HEADER.size + _U32.size:
        raise JournalCorrupt(f"{where}: truncated segment ({len(data)} bytes)")
    (crc,) = _U32.unpack(data[-_U32.size :])
    if zlib.crc32(data[: -_U32.size]) != crc:
        raise JournalCorrupt(f"{where}: segment checksum mismatch; the bytes were damaged")
    magic, count = _HEADER.unpack_from(data)
    if magic != _MAGIC or count != end:
        raise JournalCorrupt(f"{where}: not a segment of {end} entries")
    records = []
    pos = _HEADER.size
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
