"""The key layout: one LMDB database, prefixed keys, so a commit dirties few pages.

- ``b"m"``: the layout marker, ``b"runjournal-lmdb/1"``
- ``b"i" + sha256(id)`` -> invocation record
- ``b"e" + sha256(id) + index (8 bytes, big-endian)`` -> entry record
- ``b"s" + status letter + sha256(id)`` -> id (UTF-8), for listing by status

Ids are hashed so any id fits LMDB's 511-byte key limit; every record keeps
its full id, and a read checks it. Digests have one length, so no id's keys
are a prefix of another id's; big-endian indexes sort in index order.

Every key has one of these four shapes and lengths (:func:`key_kind`), so a
damaged key is usually of none of them; one that still is names another id
or index than its record, which the record's own id, id checksum or index
betrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

from runjournal.journal import InvocationStatus

__all__ = [
    "DIGEST_BYTES",
    "INDEX_BYTES",
    "MARKER",
    "MARKER_KEY",
    "STATUS_PREFIX",
    "digest",
    "entries_prefix",
    "entry_key",
    "invocation_key",
    "key_kind",
    "key_text",
    "status_key",
]

MARKER_KEY: Final = b"m"
MARKER: Final = b"runjournal-lmdb/1"
INDEX_BYTES: Final = 8
DIGEST_BYTES: Final = 32
STATUS_PREFIX: Final[Mapping[InvocationStatus, bytes]] = {
    InvocationStatus.PENDING: b"sp",
    InvocationStatus.COMPLETED: b"sc",
    InvocationStatus.FAILED: b"sf",
}


def digest(invocation_id: str) -> bytes:
    """The 32-byte SHA-256 of the id's UTF-8 bytes: every key of the id holds it."""
    return hashlib.sha256(invocation_id.encode("utf-8")).digest()


def invocation_key(hashed: bytes) -> bytes:
    """The key of the invocation record whose id has the digest ``hashed``."""
    return b"i" + hashed


def entries_prefix(hashed: bytes) -> bytes:
    """What every entry key of the invocation starts with (and no other key)."""
    return b"e" + hashed


def entry_key(hashed: bytes, index: int) -> bytes:
    """The key of entry ``index`` (0 <= index < 2**64); keys sort in index order."""
    return b"e" + hashed + index.to_bytes(INDEX_BYTES, "big")


def status_key(status: InvocationStatus, hashed: bytes) -> bytes:
    """The status-index key of the invocation while its status is ``status``."""
    return STATUS_PREFIX[status] + hashed


_KINDS: Final = {
    (MARKER_KEY[0], len(MARKER_KEY)): "marker",
    (ord("i"), 1 + DIGEST_BYTES): "invocation",
    (ord("e"), 1 + DIGEST_BYTES + INDEX_BYTES): "entry",
    (ord("s"), 2 + DIGEST_BYTES): "status",
}
_STATUS_LETTERS: Final = frozenset(prefix[1] for prefix in STATUS_PREFIX.values())


def key_kind(key: bytes) -> str | None:
    """``"marker"``, ``"invocation"``, ``"entry"`` or ``"status"``; None for a key
    of no shape this layout writes (a damaged one, or another program's)."""
    if not key:
        return None
    kind = _KINDS.get((key[0], len(key)))
    if kind == "status" and key[1] not in _STATUS_LETTERS:
        return None
    return kind


def key_text(key: bytes) -> str:
    """A key as people read it in a report: its kind letter(s), the digest's first
    bytes in hex, and an entry's index (``e:1a2b3c4d…/3``)."""
    kind = key_kind(key)
    if kind == "marker":
        return "the layout marker"
    if kind == "invocation":
        return f"key i:{key[1:7].hex()}…"
    if kind == "entry":
        return f"key e:{key[1:7].hex()}…/{int.from_bytes(key[1 + DIGEST_BYTES :], 'big')}"
    if kind == "status":
        return f"key {key[:2].decode()}:{key[2:8].hex()}…"
    return f"key {key[:12].hex()}{'…' if len(key) > 12 else ''} ({len(key)} bytes)"
