"""Find an engine by URL scheme and open it.

Built-in engines are named by dotted path and imported on first use, so
``import backends`` loads neither lmdb nor boto3. Third-party engines come
from the ``runjournal.backends`` entry-point group, read the first time a
scheme is not known, or from :func:`register_backend`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import threading
import warnings
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import attrs

from runjournal.journal import JournalBackend

__all__ = [
    "DEFAULT_URL",
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "available_schemes",
    "open_backend",
    "register_backend",
]

DEFAULT_URL = "lmdb://.runjournal"
ENTRY_POINT_GROUP = "runjournal.backends"
ENV_VAR = "RUNJOURNAL_URL"

# RFC 3986: a letter, then letters, digits, "+", "-" and ".".
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
# The packages of this distribution: an ImportError naming one of them is a
# broken install or a bug, not a missing extra.
_OWN_PACKAGES = frozenset({"runjournal"})


class EngineClass(Protocol):
    """What the registry needs of an engine class: a named constructor.

    ``from_url(url, **options)``: the URL without its query string, and the
    options, by keyword. Spelled ``*args, **kwargs`` here so that engines
    naming their options (``from_url(cls, url, *, timeout=5.0)``) match too.
    """

    def from_url(self, *args: Any, **kwargs: Any) -> JournalBackend: ...


@attrs.frozen
class _Registration:
    """One scheme's engine: loaded, or a dotted path to import on first use."""

    target: EngineClass | str
    origin: str  # shown in errors: "built-in", "entry point of 'dist'", "register_backend()"
    extra: str | None = None  # the runjournal extra a built-in needs


# scheme -> (dotted path "module:Class", extra to install or None)
_BUILTINS: dict[str, tuple[str, str | None]] = {
    "memory": ("runjournal.backends._memory:MemoryBackend", None),
    "lmdb": ("runjournal.backends.lmdb:LMDBBackend", "lmdb"),
    "s3": ("runjournal.backends.s3:S3Backend", "s3"),
}

_registry: dict[str, _Registration] = {}
_entry_points_loaded = False
_lock = threading.Lock()


def _reset() -> None:
    """Forget registrations and loaded entry points; keep the built-ins (for tests)."""
    global _entry_points_loaded
    with _lock:
        _registry.clear()
        for scheme, (path, extra) in _BUILTINS.items():
            _registry[scheme] = _Registration(path, "built-in", extra)
        _entry_points_loaded = False


_reset()


def _check_scheme(scheme: object) -> str:
    if not isinstance(scheme, str) or not _SCHEME.match(scheme):
        raise ValueError(
            f"invalid URL scheme {scheme!r}: a letter, then letters, digits, '+', '-' or '.'"
        )
    return scheme.lower()


def register_backend(scheme: str, cls: EngineClass | str, *, replace: bool = False) -> None:
    """Make ``scheme://...`` URLs open with ``cls``.

    An explicit registration wins over an engine installed under the same
    scheme through the ``runjournal.backends`` entry-point group.

    Args:
        scheme: the URL scheme: a letter, then letters, digits, ``+``, ``-``, ``.``.
            Case-insensitive.
        cls: the engine class (anything with ``from_url(url, **options)``), or
            its dotted path ``"package.module:Class"``, imported on first use.
        replace: allow replacing an engine already registered for ``scheme``
            (a built-in, or an earlier ``register_backend``).

    Raises:
        ValueError: the scheme is malformed, or taken and ``replace`` is false.
        TypeError: ``cls`` has no ``from_url``, or a dotted path is malformed.
    """
    scheme = _check_scheme(scheme)
    if isinstance(cls, str):
        _split_path(cls)
    elif not callable(getattr(cls, "from_url", None)):
        raise TypeError(f"{cls!r} has no from_url(url, **options) classmethod")
    with _lock:
        current = _registry.get(scheme)
        if current is not None and not replace and not current.origin.startswith("entry point"):
            raise ValueError(
                f"scheme {scheme!r} is already registered ({current.origin}) to "
                f"{_describe(current.target)}; pass replace=True to replace it"
            )
        _registry[scheme] = _Registration(cls, "register_backend()")


def available_schemes() -> list[str]:
    """The schemes :func:`open_backend` knows: built-in, registered and installed.

    Reads the ``runjournal.backends`` entry points if that has not happened
    yet; imports no engine.
    """
    _load_entry_points()
    with _lock:
        return sorted(_registry)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        found: dict[str, str] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            origin = f"entry point of {dist.name!r}" if dist is not None else "entry point"
            try:
                scheme = _check_scheme(ep.name)
            except ValueError:
                warnings.warn(
                    f"ignoring {ENTRY_POINT_GROUP!r} {origin} named {ep.name!r}: "
                    "not a valid URL scheme",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            current = _registry.get(scheme)
            if current is not None:
                # A built-in or an explicit register_backend() call wins; a
                # second distribution claiming a scheme is worth knowing about.
                if scheme in found and found[scheme] != ep.value:
                    warnings.warn(
                        f"two installed engines claim the {scheme}:// scheme: {found[scheme]!r} "
                        f"({current.origin}) and {ep.value!r} ({origin}); using the first",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                continue
            found[scheme] = ep.value
            _registry[scheme] = _Registration(ep.value, origin)


def _split_path(path: str) -> tuple[str, list[str]]:
    """``"pkg.mod:Class.Inner"`` or ``"pkg.mod.Class"`` -> module name and attribute chain."""
    if ":" in path:
        module_name, _, attrs_part = path.partition(":")
    else:
        module_name, _, attrs_part = path.rpartition(".")
    chain = attrs_part.split(".")
    if not module_name or not all(part.isidentifier() for part in chain):
        raise TypeError(f"{path!r} is not a dotted path like 'package.module:EngineClass'")
    return module_name, chain


def _describe(target: object) -> str:
    if isinstance(target, str):
        return repr(target)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def _import(scheme: str, reg: _Registration, path: str) -> EngineClass:
    module_name, chain = _split_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or ""
        ours = missing.partition(".")[0] in _OWN_PACKAGES
        if reg.extra is not None and not ours:
            raise ImportError(
                f"the {scheme}:// engine needs the {reg.extra!r} extra, which is not installed "
                f"({exc}); install it with: pip install 'runjournal[{reg.extra}]'",
                name=exc.name,
            ) from exc
        raise ImportError(
            f"cannot import the {scheme}:// engine {path!r} ({reg.origin}): {exc}",
            name=exc.name,
        ) from exc
    for part in chain:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(
                f"cannot load the {scheme}:// engine {path!r} ({reg.origin}): "
                f"{module_name!r} has no attribute {'.'.join(chain)!r}"
            ) from None
    if not callable(getattr(obj, "from_url", None)):
        raise TypeError(
            f"the {scheme}:// engine {path!r} ({reg.origin}) has no "
            "from_url(url, **options) classmethod"
        )
    cls: EngineClass = obj
    return cls


def _resolve(scheme: str) -> EngineClass:
    with _lock:
        known = scheme in _registry
    if not known:
        _load_entry_points()
    with _lock:
        reg = _registry.get(scheme)
        schemes = sorted(_registry)
    if reg is None:
        raise ValueError(
            f"unknown journal URL scheme {scheme!r}; known schemes: {', '.join(schemes)}. "
            f"Install the package that provides it, or register one with "
            f"runjournal.register_backend() or the {ENTRY_POINT_GROUP!r} entry-point group"
        )
    if not isinstance(reg.target, str):
        return reg.target
    cls = _import(scheme, reg, reg.target)
    with _lock:
        # Keep the loaded class, unless someone re-registered the scheme meanwhile.
        if _registry.get(scheme) == reg:
            _registry[scheme] = attrs.evolve(reg, target=cls)
    return cls


def _check_options(scheme: str, cls: EngineClass, options: Mapping[str, Any]) -> None:
    """Refuse an option ``cls.from_url`` cannot take, naming it and the engine.

    Engines that take ``**options`` check them themselves.
    """
    if not options:
        return
    try:
        params = list(inspect.signature(cls.from_url).parameters.values())
    except (TypeError, ValueError):  # not introspectable (a C function): let it decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    # The first parameter takes the URL; the others that can be named are options.
    accepted = [p.name for p in params[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"the {scheme}:// engine ({_describe(cls)}) does not take the option"
            f"{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or 'no options'}"
        )


def open_backend(url: str | Mapping[str, Any] | None = None, **options: Any) -> JournalBackend:
    """Open the journal engine a URL names.

    Args:
        url: ``scheme://...``; or a mapping ``{"url": ..., "options": {...}}``;
            or None for ``$RUNJOURNAL_URL``, else ``lmdb://.runjournal``.
            Query parameters become string options (``lmdb://x?map_size=1GB``).
        **options: engine options; they override the mapping's ``options``,
            which override query parameters.

    Returns:
        A new client, from the engine class's ``from_url(url, **options)``
        (called with the URL stripped of its query).

    Raises:
        ValueError: the URL is malformed or its scheme unknown (the error lists
            the known ones).
        ImportError: the engine's extra is not installed (says what to install).
        TypeError: an option the engine does not take (names it and the engine).
    """
    source = "journal URL"
    if url is None:
        env = os.environ.get(ENV_VAR, "").strip()
        url, source = (env, f"${ENV_VAR}") if env else (DEFAULT_URL, "default journal URL")
    if isinstance(url, Mapping):
        config = dict(url)
        try:
            raw = config.pop("url")
        except KeyError:
            raise ValueError("a journal configuration mapping needs a 'url' key") from None
        mapped = config.pop("options", None) or {}
        if config:
            raise ValueError(
                f"unknown key(s) in journal configuration: {', '.join(sorted(config))}; "
                "expected 'url' and 'options'"
            )
        if not isinstance(mapped, Mapping):
            raise ValueError(
                f"'options' in a journal configuration must be a mapping, "
                f"got {type(mapped).__name__}"
            )
        if not isinstance(raw, str):
            raise ValueError(f"'url' in a journal configuration must be a str, got {raw!r}")
        return open_backend(raw, **{**mapped, **options})
    if not isinstance(url, str):
        raise TypeError(f"a journal URL must be a str or a mapping, got {type(url).__name__}")
    parts = urlsplit(url)
    if not parts.scheme or "://" not in url:
        raise ValueError(
            f"{source} {url!r} has no scheme; write e.g. 'lmdb:///var/lib/app/journal', "
            "'memory://' or 's3://bucket/prefix'"
        )
    if parts.fragment or url.endswith("#"):
        raise ValueError(
            f"{source} {url!r} has a '#fragment', which no engine uses; "
            "write a '#' in a path as %23"
        )
    scheme = parts.scheme.lower()
    cls = _resolve(scheme)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in query:
            raise ValueError(f"{source} {url!r} sets the option {key!r} twice")
        query[key] = value
    merged = {**query, **options}
    _check_options(scheme, cls, merged)
    # Sliced, not rebuilt: urlunsplit() turns "lmdb:///abs" into "lmdb:/abs".
    bare = url.partition("?")[0]
    return cls.from_url(bare, **merged)
