"""``lmdb://`` URLs: which directory one names."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["path_from_url"]


def path_from_url(url: str) -> str:
    """The directory of ``lmdb:///absolute/path`` or ``lmdb://relative/path``
    (the query string, if any, is not part of it).

    Raises:
        ValueError: not an ``lmdb://`` URL, or one naming no directory.
    """
    parts = urlsplit(url)
    if parts.scheme != "lmdb":
        raise ValueError(f"not an lmdb:// URL: {url!r}")
    path = parts.netloc + parts.path
    if not path:
        raise ValueError(
            f"lmdb URL {url!r} names no directory; write lmdb:///abs/path or lmdb://rel/path"
        )
    return path
