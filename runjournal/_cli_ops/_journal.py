"""Which journal a command works on, and the one-line errors it can end with."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from runjournal.backends import DEFAULT_URL, ENV_VAR, open_backend
from runjournal.journal import JournalBackend

__all__ = ["CommandError", "default_url", "journal_size", "lmdb_path", "open_journal"]

#: LMDB's data file in a journal directory.
DATA_FILE = "data.mdb"


class CommandError(Exception):
    """A command cannot go on: its message is the one line the user sees.

    ``code``: the exit status (1: the journal or the request failed; 2: the
    command line is wrong).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def default_url() -> str:
    """``$RUNJOURNAL_URL``, else ``lmdb://.runjournal``: what ``Runtime()`` opens."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def lmdb_path(url: str) -> str | None:
    """The directory of an ``lmdb://`` URL, or None for another scheme."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "lmdb":
        return None
    path = parts.netloc + parts.path
    if not path:
        raise CommandError(
            f"lmdb URL {url!r} names no directory; write lmdb:///abs/path or lmdb://rel/path", 2
        )
    return path


def _normalise(url: str) -> str:
    if "://" not in url and os.path.isdir(url):
        return f"lmdb://{os.path.abspath(url)}"  # a bare journal directory
    return url


def open_journal(url: str) -> JournalBackend:
    """Open the existing journal at ``url``; never create one.

    Raises:
        CommandError: there is no journal there (LMDB), or the URL is malformed.
        JournalError: the engine could not open it.
    """
    url = _normalise(url)
    path = lmdb_path(url)
    if path is not None and not os.path.isfile(os.path.join(path, DATA_FILE)):
        where = os.path.abspath(path)
        what = "does not exist" if not os.path.exists(where) else f"holds no {DATA_FILE}"
        raise CommandError(f"no journal at {url} ({where} {what}); pass --url or set {ENV_VAR}")
    try:
        return open_backend(url)
    except (ValueError, TypeError, ImportError) as exc:
        raise CommandError(f"cannot open {url}: {exc}", 2) from exc


def journal_size(backend: JournalBackend) -> int | None:
    """Bytes the journal takes where it lives: LMDB's data file, or every S3 object
    under the prefix; None for other engines."""
    path = getattr(backend, "path", None)
    if isinstance(path, str) and os.path.isfile(os.path.join(path, DATA_FILE)):
        return os.path.getsize(os.path.join(path, DATA_FILE))
    client: Any = getattr(backend, "client", None)
    bucket = getattr(backend, "bucket", None)
    if client is not None and isinstance(bucket, str):
        prefix = str(getattr(backend, "prefix", "") or "")
        return _s3_size(client, bucket, f"{prefix.rstrip('/')}/" if prefix else "")
    return None


def _s3_size(client: Any, bucket: str, prefix: str) -> int:
    import botocore.exceptions

    total = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            total += sum(int(item.get("Size", 0)) for item in page.get("Contents", ()))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise CommandError(f"cannot measure s3://{bucket}/{prefix}: {exc}") from exc
    return total
