"""Journaled bytes (inputs, outputs, step outcomes) shown to people and scripts."""

from __future__ import annotations

import base64
import json
from typing import Any

from runjournal.journal import Codec, CodecError, Failure, JSONCodec, MsgpackCodec

__all__ = ["failure_json", "failure_text", "value_json", "value_text"]

#: The codecs runjournal ships: their bytes are decoded; any other codec's are shown raw.
BUILT_IN: dict[str, Codec] = {"json": JSONCodec(), "msgpack": MsgpackCodec()}


def _decode(codec: str, data: bytes) -> tuple[bool, Any]:
    built_in = BUILT_IN.get(codec)
    if built_in is None:
        return False, None
    try:
        return True, built_in.decode(data)
    except CodecError:
        return False, None


def _jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold spelled out: bytes as ``{"bytes_b64": ...}``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes_b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def value_text(codec: str, data: bytes | None, limit: int = 60) -> str:
    """One line: the decoded value as compact JSON (built-in codecs), else the raw bytes;
    cut to ``limit`` characters."""
    if data is None:
        return "-"
    ok, value = _decode(codec, data)
    if ok:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
    else:
        text = f"<{len(data)} bytes, codec {codec!r}> {data[:limit]!r}"
    return _truncate(text, limit)


def value_json(codec: str, data: bytes | None) -> dict[str, Any] | None:
    """``{"codec", "size", "value"}`` (decoded), or ``{"codec", "size", "bytes_b64"}``."""
    if data is None:
        return None
    ok, value = _decode(codec, data)
    if ok:
        return {"codec": codec, "size": len(data), "value": _jsonable(value)}
    return {"codec": codec, "size": len(data), "bytes_b64": base64.b64encode(data).decode()}


def failure_text(failure: Failure) -> str:
    """A terminal failure, in full: ``TypeName: message``."""
    return f"{failure.type_name}: {failure.message}"


def failure_json(failure: Failure | None) -> dict[str, str] | None:
    if failure is None:
        return None
    return {"type": failure.type_name, "message": failure.message}
