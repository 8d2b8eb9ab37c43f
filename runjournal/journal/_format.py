"""The on-disk record format shared by every engine.

A record is::

    b"RJ" | version (1 byte) | record type (1 byte) | msgpack body | CRC-32 (4 bytes, BE)

The CRC covers everything before it. The body is a msgpack array with one
slot per field, in declaration order, so a record costs no field names.
Anything that does not decode to a well-typed record raises
:class:`JournalCorrupt`; no other exception escapes :func:`decode_entry` or
:func:`decode_invocation`.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final

import msgpack

from runjournal.journal._errors import JournalCorrupt
from runjournal.journal._records import Entry, EntryKind, Failure, Invocation, InvocationStatus

__all__ = [
    "FORMAT_VERSION",
    "decode_entry",
    "decode_invocation",
    "encode_entry",
    "encode_invocation",
]

MAGIC: Final = b"RJ"
FORMAT_VERSION: Final = 1
_INVOCATION: Final = ord("I")
_ENTRY: Final = ord("E")
_HEADER: Final = len(MAGIC) + 2
_CRC: Final = struct.Struct(">I")


def _frame(kind: int, body: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    data = MAGIC + bytes((FORMAT_VERSION, kind)) + packed
    return data + _CRC.pack(zlib.crc32(data))


def _unframe(data: bytes, kind: int, what: str) -> list[Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise JournalCorrupt(f"{what} record: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER + _CRC.size:
        raise JournalCorrupt(f"{what} record: truncated ({len(data)} bytes)")
    if data[:2] != MAGIC:
        raise JournalCorrupt(f"{what} record: bad magic {data[:2]!r}; not a runjournal record")
    if data[2] != FORMAT_VERSION:
        raise JournalCorrupt(
            f"{what} record: format version {data[2]} is not supported "
            f"(this runjournal reads version {FORMAT_VERSION}); upgrade runjournal"
        )
    if data[3] != kind:
        raise JournalCorrupt(f"{what} record: record type {data[3]!r} is not {what}")
    (crc,) = _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise JournalCorrupt(f"{what} record: checksum mismatch; the bytes were damaged")
    try:
        body = msgpack.unpackb(data[_HEADER : -_CRC.size], raw=False, use_list=True)
    except Exception as exc:  # msgpack raises many types on bad input
        raise JournalCorrupt(f"{what} record: body is not valid msgpack ({exc})") from exc
    if not isinstance(body, list):
        raise JournalCorrupt(f"{what} record: body is not an array")
    return body


def _typed(value: Any, types: type | tuple[type, ...], field: str) -> Any:
    # bool is an int subclass, and no slot of a record holds a bool.
    if isinstance(value, bool) or not isinstance(value, types):
        raise JournalCorrupt(f"field {field!r} has type {type(value).__name__}")
    return value


def _encode_failure(failure: Failure | None) -> list[str] | None:
    return None if failure is None else [failure.type_name, failure.message]


def _decode_failure(value: Any) -> Failure | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise JournalCorrupt("field 'failure' is not a [type, message] pair")
    return Failure(_typed(value[0], str, "failure.type"), _typed(value[1], str, "failure.message"))


def _number(value: Any, field: str) -> float:
    return float(_typed(value, (int, float), field))


def encode_invocation(inv: Invocation) -> bytes:
    """Serialise an invocation record."""
    return _frame(
        _INVOCATION,
        [
            inv.id,
            inv.handler,
            inv.input,
            inv.codec,
            inv.status.value,
            inv.output,
            _encode_failure(inv.failure),
            inv.created_at,
            inv.updated_at,
            inv.version,
        ],
    )


def decode_invocation(data: bytes) -> Invocation:
    """Parse an invocation record.

    Raises:
        JournalCorrupt: the bytes are not a valid invocation record.
    """
    body = _unframe(data, _INVOCATION, "invocation")
    if len(body) != 10:
        raise JournalCorrupt(f"invocation record: {len(body)} fields, expected 10")
    try:
        status = InvocationStatus(body[4])
    except ValueError as exc:
        raise JournalCorrupt(f"invocation record: unknown status {body[4]!r}") from exc
    try:
        return Invocation(
            id=_typed(body[0], str, "id"),
            handler=_typed(body[1], str, "handler"),
            input=_typed(body[2], bytes, "input"),
            codec=_typed(body[3], str, "codec"),
            status=status,
            output=_typed(body[5], (bytes, type(None)), "output"),
            failure=_decode_failure(body[6]),
            created_at=_number(body[7], "created_at"),
            updated_at=_number(body[8], "updated_at"),
            version=_typed(body[9], int, "version"),
        )
    except ValueError as exc:  # attrs validators
        raise JournalCorrupt(f"invocation record: {exc}") from exc


def encode_entry(entry: Entry) -> bytes:
    """Serialise an entry record."""
    return _frame(
        _ENTRY,
        [
            entry.index,
            entry.kind.value,
            entry.name,
            entry.payload,
            entry.codec,
            _encode_failure(entry.failure),
            entry.created_at,
            entry.attempts,
        ],
    )


_KINDS: Final = {kind.value: kind for kind in EntryKind}


def decode_entry(data: bytes) -> Entry:
    """Parse an entry record.

    Raises:
        JournalCorrupt: the bytes are not a valid entry record.
    """
    body = _unframe(data, _ENTRY, "entry")
    if len(body) != 8:
        raise JournalCorrupt(f"entry record: {len(body)} fields, expected 8")
    index, kind, name, payload, codec, failure, created_at, attempts = body
    # Replay decodes every entry, so the checks are inline rather than per-field calls.
    if type(index) is not int or index < 0:
        raise JournalCorrupt(f"entry record: bad index {index!r}")
    try:
        entry_kind = _KINDS[kind]
    except (KeyError, TypeError):
        raise JournalCorrupt(f"entry record: unknown kind {kind!r}") from None
    if name is not None and type(name) is not str:
        raise JournalCorrupt(f"entry record: field 'name' has type {type(name).__name__}")
    if payload is not None and type(payload) is not bytes:
        raise JournalCorrupt(f"entry record: field 'payload' has type {type(payload).__name__}")
    if type(codec) is not str:
        raise JournalCorrupt(f"entry record: field 'codec' has type {type(codec).__name__}")
    if type(attempts) is not int:
        raise JournalCorrupt(f"entry record: field 'attempts' has type {type(attempts).__name__}")
    return Entry(
        index,
        entry_kind,
        name,
        payload,
        codec,
        _decode_failure(failure),
        _number(created_at, "created_at"),
        attempts,
    )
