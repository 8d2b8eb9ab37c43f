"""The built-in codecs."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runjournal.journal import Codec, CodecError, JSONCodec, MsgpackCodec

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def test_codecs_satisfy_the_protocol() -> None:
    assert isinstance(JSONCodec(), Codec) and isinstance(MsgpackCodec(), Codec)


@given(json_values)
def test_json_round_trips_and_is_deterministic(value: Any) -> None:
    codec = JSONCodec()
    data = codec.encode(value)
    assert codec.decode(data) == value
    if isinstance(value, dict):
        assert codec.encode(dict(reversed(list(value.items())))) == data


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@given(msgpack_values)
def test_msgpack_round_trips(value: Any) -> None:
    codec = MsgpackCodec()
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize("value", [object(), {1, 2}, math.nan, b"bytes"])
def test_json_refuses_what_it_cannot_represent(value: Any) -> None:
    with pytest.raises(CodecError, match="json codec cannot encode"):
        JSONCodec().encode(value)


def test_msgpack_refuses_out_of_range_ints() -> None:
    with pytest.raises(CodecError, match="msgpack codec cannot encode a value of type int"):
        MsgpackCodec().encode(2**70)


@pytest.mark.parametrize("codec", [JSONCodec(), MsgpackCodec()])
def test_bad_bytes_raise_codec_error(codec: Codec) -> None:
    with pytest.raises(CodecError):
        codec.decode(b"\xc1\xff{")
