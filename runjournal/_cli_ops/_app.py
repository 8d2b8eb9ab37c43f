"""``module:attribute``: the Runtime of the user's application, for ``recover`` and ``worker``."""

from __future__ import annotations

import importlib
import os
import sys

from runjournal._cli_ops._journal import CommandError
from runjournal.context import Runtime

__all__ = ["load_runtime"]


def load_runtime(spec: str) -> Runtime:
    """Import ``module:attribute`` (a dotted attribute) from the current directory or
    ``sys.path``: a :class:`Runtime`, or a function returning one.

    Raises:
        CommandError: the spec is malformed, the import fails, or the object is
            no Runtime. (``--debug`` shows the import's traceback.)
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CommandError(
            f"APP must be module:attribute, e.g. shop.worker:runtime, got {spec!r}", 2
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the app next to the caller
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:
            raise CommandError(
                f"cannot import {module_name!r} (APP {spec}): no such module from "
                f"{os.getcwd()} or sys.path"
            ) from exc
        raise CommandError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise CommandError(
                f"{module_name!r} has no attribute {attribute!r} (APP {spec})"
            ) from None
    if not isinstance(target, Runtime) and callable(target):
        target = target()
    if not isinstance(target, Runtime):
        raise CommandError(
            f"APP {spec} is a {type(target).__name__}, not a runjournal.Runtime (or a function "
            "returning one)"
        )
    return target
