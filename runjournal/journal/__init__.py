"""The storage-facing core of runjournal: records, the backend protocol, the
record format, codecs and errors. Imports nothing else of runjournal's."""

from runjournal.journal._codec import Codec, JSONCodec, MsgpackCodec, decode_value, encode_value
from runjournal.journal._errors import (
    BackendUnavailable,
    CodecError,
    ConflictError,
    EntryConflict,
    InvocationNotFound,
    JournalCorrupt,
    JournalError,
    TransientError,
    VersionConflict,
)
from runjournal.journal._format import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    decode_entry,
    decode_invocation,
    encode_entry,
    encode_invocation,
)
from runjournal.journal._protocol import Capabilities, JournalBackend
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
    "BackendUnavailable",
    "Capabilities",
    "Codec",
    "CodecError",
    "ConflictError",
    "Entry",
    "EntryConflict",
    "EntryKind",
    "Failure",
    "Invocation",
    "InvocationNotFound",
    "InvocationStatus",
    "JSONCodec",
    "JournalBackend",
    "JournalCorrupt",
    "JournalError",
    "Lease",
    "MsgpackCodec",
    "READABLE_VERSIONS",
    "StepProgress",
    "TransientError",
    "VersionConflict",
    "decode_entry",
    "decode_invocation",
    "decode_value",
    "encode_entry",
    "encode_invocation",
    "encode_value",
]
