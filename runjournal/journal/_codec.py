"""Codecs turn step results into journal bytes and back. No pickle, ever."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgpack

from runjournal.journal._errors import CodecError

__all__ = ["Codec", "JSONCodec", "MsgpackCodec", "decode_value", "encode_value"]


@runtime_checkable
class Codec(Protocol):
    """Encodes values to bytes and back.

    ``name`` is stored beside every payload, so replay can tell when the code
    asks for another codec than the one that wrote the bytes.
    """

    name: str

    def encode(self, value: Any) -> bytes:
        """Return ``value`` as bytes; raise :class:`CodecError` if it cannot."""
        ...

    def decode(self, data: bytes) -> Any:
        """Return the value ``data`` encodes; raise :class:`CodecError` if it cannot."""
        ...


class JSONCodec:
    """JSON with sorted keys and no spaces, so equal values give equal bytes.

    NaN and infinity are refused (they are not JSON). Tuples come back as lists.
    """

    name = "json"
    _encoder = json.JSONEncoder(
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    _decoder = json.JSONDecoder()

    def encode(self, value: Any) -> bytes:
        try:
            text = self._encoder.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(
                f"the json codec cannot encode a value of type {type(value).__name__}: {exc}"
            ) from exc
        return text.encode("utf-8")

    def decode(self, data: bytes) -> Any:
        try:
            return self._decoder.decode(data.decode("utf-8"))
        except (AttributeError, TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"the json codec cannot decode {len(data)} bytes: {exc}") from exc

    def __repr__(self) -> str:
        return "JSONCodec()"


class MsgpackCodec:
    """msgpack: compact, and ``bytes`` round-trip as bytes. Tuples come back as lists."""

    name = "msgpack"

    def encode(self, value: Any) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(
                f"the msgpack codec cannot encode a value of type {type(value).__name__}: {exc}"
            ) from exc

    def decode(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise CodecError(f"the msgpack codec cannot decode {len(data)} bytes: {exc}") from exc

    def __repr__(self) -> str:
        return "MsgpackCodec()"


def encode_value(codec: Codec, value: Any, what: str | Callable[[], str]) -> bytes:
    """``codec.encode(value)``, with every failure a :class:`CodecError` naming ``what``.

    The one place values meet codecs on the way in: a user codec may raise
    anything, or return something that is not bytes.

    Args:
        codec: the codec to use.
        value: the value to encode.
        what: what the value is, for the message (e.g. ``"run 'charge'
            (invocation 'order-42', index 3): the result"``), or a function
            returning it (called only on failure).
    """
    try:
        data = codec.encode(value)
    except Exception as exc:
        raise CodecError(
            f"{_text(what)} cannot be journaled: {_reason(codec, exc, value)}"
        ) from exc
    if not isinstance(data, bytes):
        raise CodecError(
            f"{_text(what)} cannot be journaled: codec {codec.name!r} returned "
            f"{type(data).__name__}, not bytes"
        )
    return data


def decode_value(codec: Codec, data: bytes, what: str | Callable[[], str]) -> Any:
    """``codec.decode(data)``, with every failure a :class:`CodecError` naming ``what``
    (a string, or a function returning it)."""
    try:
        return codec.decode(data)
    except Exception as exc:
        raise CodecError(
            f"{_text(what)} cannot be read back from the journal ({len(data)} bytes): "
            f"{_reason(codec, exc)}"
        ) from exc


def _text(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _reason(codec: Codec, exc: Exception, value: Any = None) -> str:
    if isinstance(exc, CodecError):  # a codec's own error already says what failed
        return str(exc)
    subject = "" if value is None else f" on a {type(value).__name__}"
    return f"codec {codec.name!r} failed{subject}: {type(exc).__name__}: {exc}"
