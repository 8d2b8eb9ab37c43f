"""Journal engines (memory, lmdb, s3) and the registry that opens them by URL.

Importing this package imports no engine SDK; ``runjournal.backends.lmdb`` and
``runjournal.backends.s3`` load theirs when first used.
"""

from runjournal.backends._memory import MemoryBackend, MemoryStore
from runjournal.backends._registry import (
    DEFAULT_URL,
    ENTRY_POINT_GROUP,
    ENV_VAR,
    available_schemes,
    open_backend,
    register_backend,
)

__all__ = [
    "DEFAULT_URL",
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "MemoryBackend",
    "MemoryStore",
    "available_schemes",
    "open_backend",
    "register_backend",
]
