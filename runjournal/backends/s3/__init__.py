"""The S3 engine: one journal shared by many machines through an object store.

Every guarantee comes from S3's conditional writes, never from a
check-then-write: an entry is created with ``If-None-Match: *`` (a second
writer at the same index gets :class:`runjournal.journal.EntryConflict`), an
invocation record is replaced with ``If-Match: <etag>`` (compare-and-swap; a
loser gets :class:`runjournal.journal.VersionConflict`). A store that silently
ignores those headers is detected on the first write and refused.

Keys, under ``<prefix>/`` (``<k>`` is the invocation id's key segment, see
:func:`encode_id`; numbers are zero-padded to 20 digits so keys sort by number)::

    inv/<k>                       the invocation record (journal.encode_invocation)
    ent/<k>/<index>               one entry, written once (journal.encode_entry)
    seg/<k>/<end>                 entries [0, end) packed into one object (a read cache)
    status/<status>/<k>/<version> an empty marker: version <version> has <status>
    probe/<random>                short-lived, for the conditional-write check

Entries stay the source of truth: a segment only ever packs a gap-free run
of entries this client read or wrote itself, entries are immutable, and the
per-index objects are never removed, so an append at an index a segment
covers still meets its object and conflicts.

The pieces, each small and tested alone: ``_keys`` (ids to key segments, the
layout), ``_segments`` (the segment format), ``_errors`` (botocore's errors
mapped onto journal's), ``_known`` (what one client knows of the invocations
it touched), ``_requests`` (requests with retries, the conditional-write
probe) and ``_backend`` (:class:`S3Backend`). :mod:`runjournal.backends.s3.testing`
is a moto S3 server for tests and benchmarks; it needs moto (the ``test``
extra) and the engine never imports it.
"""

from __future__ import annotations

from runjournal.backends.s3._backend import S3Backend
from runjournal.backends.s3._keys import MAX_PREFIX_BYTES, MAX_SEGMENT_CHARS, decode_id, encode_id
from runjournal.backends.s3._segments import MAX_SEGMENT_BYTES

__all__ = [
    "MAX_PREFIX_BYTES",
    "MAX_SEGMENT_BYTES",
    "MAX_SEGMENT_CHARS",
    "S3Backend",
    "decode_id",
    "encode_id",
]
