"""Key names: invocation ids as key segments, padded numbers, the layout under a prefix.

Pure: no boto. See the package docstring for the layout itself.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Final

import attrs

from runjournal.journal import InvocationStatus, JournalCorrupt

__all__ = [
    "MAX_INDEX",
    "MAX_PREFIX_BYTES",
    "MAX_SEGMENT_CHARS",
    "KeyLayout",
    "check_prefix",
    "decode_id",
    "encode_id",
    "number",
]

#: The longest key segment an id maps to reversibly; longer ones are hashed.
MAX_SEGMENT_CHARS: Final = 512
#: The longest prefix accepted, so every key stays under S3's 1024-byte limit.
MAX_PREFIX_BYTES: Final = 400
#: The largest number (entry index, record version) a key can hold.
MAX_INDEX: Final = 10**20 - 1

_HASHED: Final = "~~"
_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPED: Final = re.compile(r"~([0-9A-F]{2})")


def encode_id(invocation_id: str) -> str:
    """Map an invocation id to one key segment, injectively.

    ASCII letters, digits, ``-`` and ``_`` stay as they are; every other
    character becomes ``~XX`` per UTF-8 byte, so the segment holds no ``/``
    and is never ``.`` or ``..``. An escaped id longer than
    :data:`MAX_SEGMENT_CHARS` becomes ``~~`` and the SHA-256 of its UTF-8
    bytes (an escaped id never contains ``~~``, so the two forms never meet).
    """
    escaped = "".join(
        ch if ch in _SAFE else "".join(f"~{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        for ch in invocation_id
    )
    if len(escaped) <= MAX_SEGMENT_CHARS:
        return escaped
    digest = hashlib.sha256(invocation_id.encode("utf-8", "surrogatepass")).hexdigest()
    return _HASHED + digest


def decode_id(segment: str) -> str | None:
    """Invert :func:`encode_id`; None for a hashed segment (read the record for its id).

    Raises:
        JournalCorrupt: the segment is not one :func:`encode_id` produces.
    """
    if segment.startswith(_HASHED):
        return None
    if any(ch not in _SAFE and ch != "~" for ch in segment):
        raise JournalCorrupt(f"S3 key segment {segment!r} is not an encoded invocation id")
    out = bytearray()
    pos = 0
    for match in _ESCAPED.finditer(segment):
        out += segment[pos : match.start()].encode("ascii")
        out.append(int(match.group(1), 16))
        pos = match.end()
    rest = segment[pos:]
    if "~" in rest:
        raise JournalCorrupt(f"S3 key segment {segment!r} has a stray '~'")
    out += rest.encode("ascii")
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise JournalCorrupt(f"S3 key segment {segment!r} is not UTF-8") from exc


def number(n: int) -> str:
    """``n`` zero-padded to 20 digits, so keys sort by number.

    Raises:
        ValueError: ``n`` is negative or above :data:`MAX_INDEX`.
    """
    if not 0 <= n <= MAX_INDEX:
        raise ValueError(f"{n} is out of the range the S3 engine stores (0..{MAX_INDEX})")
    return f"{n:020d}"


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` without its outer slashes, or raise ValueError if it is unsafe.

    Raises:
        ValueError: longer than :data:`MAX_PREFIX_BYTES`, an empty, ``.`` or
            ``..`` segment, or a control character.
    """
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_PREFIX_BYTES:
        raise ValueError(f"S3 prefix is longer than {MAX_PREFIX_BYTES} bytes: {prefix!r}")
    for part in prefix.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"S3 prefix {prefix!r} has an empty, '.' or '..' segment")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix):
        raise ValueError(f"S3 prefix {prefix!r} contains a control character")
    return prefix


@attrs.frozen
class KeyLayout:
    """The key names under one prefix; ``k`` is an id's segment (:func:`encode_id`).

    Attributes:
        root: the checked prefix followed by ``/``, or ``""`` for none.
    """

    root: str

    @classmethod
    def under(cls, prefix: str) -> KeyLayout:
        """The layout under ``prefix`` (checked with :func:`check_prefix`)."""
        prefix = check_prefix(prefix)
        return cls(f"{prefix}/" if prefix else "")

    @property
    def records_dir(self) -> str:
        return f"{self.root}inv/"

    def record(self, k: str) -> str:
        return f"{self.root}inv/{k}"

    def entries_dir(self, k: str) -> str:
        return f"{self.root}ent/{k}/"

    def entry(self, k: str, index: int) -> str:
        return self.entries_dir(k) + number(index)

    def segments_dir(self, k: str) -> str:
        return f"{self.root}seg/{k}/"

    def segment(self, k: str, end: int) -> str:
        return self.segments_dir(k) + number(end)

    def status_dir(self, status: InvocationStatus, k: str | None = None) -> str:
        """Markers of ``status``: all of them, or those of one invocation."""
        base = f"{self.root}status/{status.value}/"
        return base if k is None else f"{base}{k}/"

    def status_marker(self, status: InvocationStatus, k: str, version: int) -> str:
        return self.status_dir(status, k) + number(version)

    def probe(self) -> str:
        """A fresh key for the conditional-write probe."""
        return f"{self.root}probe/{uuid.uuid4().hex}"

    @staticmethod
    def number_in(key: str, directory: str) -> int:
        """The number a key under ``directory`` ends with (an index or a segment end)."""
        return int(key[len(directory) :])
