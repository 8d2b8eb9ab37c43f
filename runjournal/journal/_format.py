"""The on-disk record format shared by every engine.

A record is::

    b"RJ" | version (1 byte) | record type (1 byte) | msgpack body | CRC-32 (4 bytes, BE)

The CRC covers everything before it. The body is a msgpack array with one
slot per field, in declaration order, so a record costs no field names.
Anything that does not decode to a well-typed record raises
:class:`JournalCorrupt`; no other exception escapes :func:`decode_entry` or
:func:`decode_invocation`.

Version 2 (written since runjournal 0.2) adds to an invocation its lease
(``[owner, incarnation, epoch, expires_at]`` or nil) and the progress of its
unfinished steps (``[[index, attempts, first_started_at, in_flight,
last_error], ...]``); and to an entry the CRC-32 of the id of the invocation
it was written for, so an entry read under another invocation is caught.
Version 1 records still decode (no lease, no progress, no binding).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final

import msgpack

from runjournal.journal._errors import JournalCorrupt
from runjournal.journal._records import (
    Entry,
    EntryKind,
    Failure,
    Invocation,
    InvocationStatus,
    Lease,
    StepProgress,
)

__all__ = [
    "FORMAT_VERSION",
    "decode_entry",
    "decode_invocation",
    "encode_entry",
    "encode_invocation",
]

MAGIC: Final = b"RJ"
FORMAT_VERSION: Final = 2
READABLE_VERSIONS: Final = frozenset({1, 2})
_INVOCATION: Final = ord("I")
_ENTRY: Final = ord("E")
_HEADER: Final = len(MAGIC) + 2
_CRC: Final = struct.Struct(">I")


def _frame(kind: int, body: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    data = MAGIC + bytes((FORMAT_VERSION, kind)) + packed
    return data + _CRC.pack(zlib.crc32(data))


def _unframe(data: bytes, kind: int, what: str) -> tuple[int, list[Any]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise JournalCorrupt(f"{what} record: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER + _CRC.size:
        raise JournalCorrupt(f"{what} record: truncated ({len(data)} bytes)")
    if data[:2] != MAGIC:
        raise JournalCorrupt(f"{what} record: bad magic {data[:2]!r}; not a runjournal record")
    if data[2] not in READABLE_VERSIONS:
        raise JournalCorrupt(
            f"{what} record: format version {data[2]} is not supported "
            f"(this runjournal reads versions {', '.join(map(str, sorted(READABLE_VERSIONS)))})"
            "; upgrade runjournal"
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
    return data[2], body


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


def _encode_lease(lease: Lease | None) -> list[Any] | None:
    if lease is None:
        return None
    return [lease.owner, lease.incarnation, lease.epoch, lease.expires_at]


def _decode_lease(value: Any) -> Lease | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise JournalCorrupt("field 'lease' is not an [owner, incarnation, epoch, expiry] array")
    return Lease(
        owner=_typed(value[0], str, "lease.owner"),
        incarnation=_typed(value[1], int, "lease.incarnation"),
        epoch=_typed(value[2], int, "lease.epoch"),
        expires_at=_number(value[3], "lease.expires_at"),
    )


def _encode_steps(steps: tuple[StepProgress, ...]) -> list[list[Any]]:
    return [
        [
            step.index,
            step.attempts,
            step.first_started_at,
            int(step.in_flight),
            _encode_failure(step.last_error),
        ]
        for step in steps
    ]


def _decode_steps(value: Any) -> tuple[StepProgress, ...]:
    if not isinstance(value, list):
        raise JournalCorrupt("field 'steps' is not an array")
    steps = []
    for item in value:
        if not isinstance(item, list) or len(item) != 5:
            raise JournalCorrupt("field 'steps' holds an item that is not a 5-slot array")
        in_flight = _typed(item[3], int, "steps.in_flight")
        if in_flight not in (0, 1):
            raise JournalCorrupt(f"field 'steps.in_flight' is {in_flight}, not 0 or 1")
        steps.append(
            StepProgress(
                index=_typed(item[0], int, "steps.index"),
                attempts=_typed(item[1], int, "steps.attempts"),
                first_started_at=_number(item[2], "steps.first_started_at"),
                in_flight=bool(in_flight),
                last_error=_decode_failure(item[4]),
            )
        )
    indexes = [step.index for step in steps]
    if indexes != sorted(set(indexes)):
        raise JournalCorrupt("field 'steps' is not sorted by distinct index")
    return tuple(steps)


def encode_invocation(inv: Invocation) -> bytes:
    """Serialise an invocation record (format version 2)."""
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
            _encode_lease(inv.lease),
            _encode_steps(inv.steps),
        ],
    )


_INVOCATION_FIELDS: Final = {1: 10, 2: 12}


def decode_invocation(data: bytes) -> Invocation:
    """Parse an invocation record of any readable format version.

    Raises:
        JournalCorrupt: the bytes are not a valid invocation record.
    """
    version, body = _unframe(data, _INVOCATION, "invocation")
    expected = _INVOCATION_FIELDS[version]
    if len(body) != expected:
        raise JournalCorrupt(
            f"invocation record: {len(body)} fields, expected {expected} (format {version})"
        )
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
            lease=_decode_lease(body[10]) if version >= 2 else None,
            steps=_decode_steps(body[11]) if version >= 2 else (),
        )
    except ValueError as exc:  # attrs validators
        raise JournalCorrupt(f"invocation record: {exc}") from exc


def binding(invocation_id: str) -> int:
    """The CRC-32 of an invocation id, stored in each of its entries (format 2)."""
    return zlib.crc32(invocation_id.encode("utf-8", "surrogatepass"))


def encode_entry(entry: Entry, invocation_id: str | None = None) -> bytes:
    """Serialise an entry record (format version 2).

    Args:
        entry: the entry.
        invocation_id: the invocation it belongs to; its checksum is stored,
            so :func:`decode_entry` given another id raises JournalCorrupt.
            Engines should pass it (None stores no binding).
    """
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
            None if invocation_id is None else binding(invocation_id),
        ],
    )


_KINDS: Final = {kind.value: kind for kind in EntryKind}
_ENTRY_FIELDS: Final = {1: 8, 2: 9}


def decode_entry(data: bytes, invocation_id: str | None = None) -> Entry:
    """Parse an entry record of any readable format version.

    Args:
        data: the record's bytes.
        invocation_id: the invocation it was read under; when given and the
            record carries a binding (format 2), they must agree.

    Raises:
        JournalCorrupt: the bytes are not a valid entry record, or the entry
            belongs to another invocation.
    """
    version, body = _unframe(data, _ENTRY, "entry")
    expected = _ENTRY_FIELDS[version]
    if len(body) != expected:
        raise JournalCorrupt(
            f"entry record: {len(body)} fields, expected {expected} (format {version})"
        )
    index, kind, name, payload, codec, failure, created_at, attempts = body[:8]
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
    if version >= 2:
        bound = body[8]
        if bound is not None and type(bound) is not int:
            raise JournalCorrupt(f"entry record: field 'binding' has type {type(bound).__name__}")
        if bound is not None and invocation_id is not None and bound != binding(invocation_id):
            raise JournalCorrupt(
                f"entry record at index {index} was written for another invocation than "
                f"{invocation_id!r} (its binding does not match)"
            )
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
