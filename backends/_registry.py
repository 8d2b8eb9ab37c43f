"""Find an engine by URL scheme and open it.

Built-in engines are named by dotted path and imported on first use, so
``import backends`` loads neither lmdb nor boto3. Third-party engines come
from the ``runjournal.backends`` entry-point group, read the first time a
scheme is not known, or from :func:`register_backend`.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from journal import JournalBackend

__all__ = ["DEFAULT_URL", "ENTRY_POINT_GROUP", "open_backend", "register_backend"]

DEFAULT_URL = "lmdb://.runjournal"
ENTRY_POINT_GROUP = "runjournal.backends"
ENV_VAR = "RUNJOURNAL_URL"


class EngineClass(Protocol):
    """What the registry needs of an engine class: a named constructor."""

    def from_url(self, url: str, **options: Any) -> JournalBackend: ...


# scheme -> (dotted path "module:Class", extra to install or None)
_BUILTINS: dict[str, tuple[str, str | None]] = {
    "memory": ("backends._memory:MemoryBackend", None),
    "lmdb": ("backends.lmdb:LMDBBackend", "lmdb"),
    "s3": ("backends.s3:S3Backend", "s3"),
}

_registry: dict[str, EngineClass | str] = {}
_extras: dict[str, str | None] = {}
_entry_points_loaded = False
_lock = threading.Lock()


def _reset() -> None:
    """Restore the built-in registry (for tests)."""
    global _entry_points_loaded
    with _lock:
        _registry.clear()
        _extras.clear()
        for scheme, (path, extra) in _BUILTINS.items():
            _registry[scheme] = path
            _extras[scheme] = extra
        _entry_points_loaded = False


_reset()


def register_backend(scheme: str, cls: EngineClass | str, *, replace: bool = False) -> None:
    """Make ``scheme://...`` URLs open with ``cls``.

    Args:
        scheme: the URL scheme, lower case letters, digits, ``+``, ``-``, ``.``.
        cls: the engine class (anything with ``from_url``), or its dotted path
            ``"package.module:Class"``, imported on first use.
        replace: allow replacing an engine already registered for ``scheme``.

    Raises:
        ValueError: the scheme is malformed, or taken and ``replace`` is false.
    """
    if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"invalid URL scheme {scheme!r}")
    scheme = scheme.lower()
    if not isinstance(cls, str) and not callable(getattr(cls, "from_url", None)):
        raise TypeError(f"{cls!r} has no from_url(url, **options) classmethod")
    with _lock:
        if scheme in _registry and not replace:
            raise ValueError(
                f"scheme {scheme!r} is already registered to {_registry[scheme]!r}; "
                "pass replace=True to replace it"
            )
        _registry[scheme] = cls
        _extras[scheme] = None


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            # An explicit register_backend() call wins over an installed plugin.
            _registry.setdefault(ep.name.lower(), ep.value)
            _extras.setdefault(ep.name.lower(), None)


def _resolve(scheme: str) -> EngineClass:
    if scheme not in _registry:
        _load_entry_points()
    with _lock:
        target = _registry.get(scheme)
        extra = _extras.get(scheme)
        known = sorted(_registry)
    if target is None:
        raise ValueError(
            f"unknown journal URL scheme {scheme!r}; known schemes: {', '.join(known)}. "
            f"Register one with backends.register_backend() or the "
            f"{ENTRY_POINT_GROUP!r} entry-point group"
        )
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is not None:
            raise ImportError(
                f"the {scheme}:// engine needs an extra: pip install 'runjournal[{extra}]'"
            ) from exc
        raise
    cls: EngineClass = getattr(module, attr) if attr else module
    with _lock:
        if _registry.get(scheme) == target:
            _registry[scheme] = cls
    return cls


def open_backend(url: str | Mapping[str, Any] | None = None, **options: Any) -> JournalBackend:
    """Open the journal engine a URL names.

    Args:
        url: ``scheme://...``; or a mapping ``{"url": ..., "options": {...}}``;
            or None for ``$RUNJOURNAL_URL``, else ``lmdb://.runjournal``.
            Query parameters become string options (``lmdb://x?map_size=1GB``).
        **options: engine options; they override query parameters.

    Raises:
        ValueError: the URL is malformed or its scheme unknown.
        ImportError: the engine's extra is not installed (says what to install).
        TypeError: an option the engine does not take (the engine names it).
    """
    if url is None:
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    if isinstance(url, Mapping):
        config = dict(url)
        try:
            raw = config.pop("url")
        except KeyError:
            raise ValueError("a journal configuration mapping needs a 'url' key") from None
        extra_options = dict(config.pop("options", None) or {})
        if config:
            raise ValueError(
                f"unknown key(s) in journal configuration: {', '.join(sorted(config))}; "
                "expected 'url' and 'options'"
            )
        return open_backend(raw, **{**extra_options, **options})
    if not isinstance(url, str):
        raise TypeError(f"a journal URL must be a str, got {type(url).__name__}")
    parts = urlsplit(url)
    if not parts.scheme or "://" not in url:
        raise ValueError(
            f"journal URL {url!r} has no scheme; write e.g. 'lmdb:///var/lib/app/journal', "
            "'memory://' or 's3://bucket/prefix'"
        )
    cls = _resolve(parts.scheme.lower())
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    bare = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return cls.from_url(bare, **{**query, **options})
