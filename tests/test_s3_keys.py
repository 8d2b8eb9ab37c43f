"""The S3 engine's key names, alone: id encoding, numbers, prefixes, the layout. No server."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runjournal.backends.s3 import MAX_PREFIX_BYTES, MAX_SEGMENT_CHARS, decode_id, encode_id
from runjournal.backends.s3._keys import MAX_INDEX, KeyLayout, check_prefix, number
from runjournal.journal import InvocationStatus, JournalCorrupt
from runjournal.journal.testing import AWKWARD_IDS

ids = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=400) | st.sampled_from(
    [*AWKWARD_IDS, "~", "~~", "~41", "A", ".", "x" * 600, "é" * 300, "a/" * 300]
)
# Any str, lone surrogates included: encode_id must not fail on what Python can hold.
any_ids = st.text(
    alphabet=st.characters() | st.characters(categories=["Cs"]), min_size=1, max_size=300
) | st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00"])


@given(a=ids, b=ids)
@settings(max_examples=300, deadline=None)
def test_id_keys_are_injective_and_stay_inside_the_prefix(a: str, b: str) -> None:
    for inv_id in (a, b):
        segment = encode_id(inv_id)
        assert "/" not in segment and segment not in (".", "..")
        assert segment.isascii() and segment.isprintable()
        assert len(segment) <= MAX_SEGMENT_CHARS + 2
        decoded = decode_id(segment)
        if decoded is None:
            digest = hashlib.sha256(inv_id.encode("utf-8", "surrogatepass")).hexdigest()
            assert segment == "~~" + digest
        else:
            assert decoded == inv_id
    if a != b:
        assert encode_id(a) != encode_id(b)


@given(inv_id=any_ids)
@settings(max_examples=200, deadline=None)
def test_any_str_round_trips_or_hashes(inv_id: str) -> None:
    segment = encode_id(inv_id)
    assert decode_id(segment) in (inv_id, None)
    assert encode_id(inv_id) == segment  # deterministic


def test_ids_of_300_characters() -> None:
    assert decode_id(encode_id("x" * 300)) == "x" * 300  # readable, reversible
    long_unicode = "ключ" * 75
    assert encode_id(long_unicode).startswith("~~")  # too long escaped: hashed
    assert encode_id(long_unicode) != encode_id(long_unicode[:-1])


def test_escaping_is_readable() -> None:
    assert encode_id("order-42_b") == "order-42_b"
    assert encode_id("order/42") == "order~2F42"
    assert encode_id("~") == "~7E"
    assert encode_id("é") == "~C3~A9"
    assert encode_id("\ud83d\ude00") != encode_id("\U0001f600")  # a surrogate pair is not 😀
    assert encode_id("x" * MAX_SEGMENT_CHARS) == "x" * MAX_SEGMENT_CHARS
    assert encode_id("x" * (MAX_SEGMENT_CHARS + 1)).startswith("~~")


@pytest.mark.parametrize(
    "segment",
    ["a/b", "a b", "é", "~", "~4", "a~", "~zz", "~2f", "~FF", "~C3"],
)
def test_decode_refuses_segments_encode_never_makes(segment: str) -> None:
    with pytest.raises(JournalCorrupt, match="S3 key segment"):
        decode_id(segment)


def test_decode_of_a_hashed_segment_is_none() -> None:
    assert decode_id("~~" + "0" * 64) is None


@given(a=st.integers(0, MAX_INDEX), b=st.integers(0, MAX_INDEX))
def test_numbers_sort_as_keys_as_they_do_as_numbers(a: int, b: int) -> None:
    assert len(number(a)) == 20
    assert int(number(a)) == a
    assert (number(a) < number(b)) == (a < b)


@pytest.mark.parametrize("n", [-1, MAX_INDEX + 1])
def test_numbers_out_of_range_are_refused(n: int) -> None:
    with pytest.raises(ValueError, match="out of the range"):
        number(n)


@pytest.mark.parametrize(
    ("prefix", "checked"),
    [
        ("", ""),
        ("/", ""),
        ("tenant", "tenant"),
        ("/a/b/", "a/b"),
        ("p" * MAX_PREFIX_BYTES, "p" * MAX_PREFIX_BYTES),
    ],
)
def test_prefixes_lose_their_outer_slashes(prefix: str, checked: str) -> None:
    assert check_prefix(prefix) == checked


@pytest.mark.parametrize(
    ("prefix", "match"),
    [
        ("a/../b", r"'\.\.'"),
        ("a/./b", r"'\.'"),
        ("..", r"'\.\.'"),
        ("a//b", "empty"),
        ("a\nb", "control character"),
        ("a\x7fb", "control character"),
        ("p" * (MAX_PREFIX_BYTES + 1), "longer than"),
        ("é" * (MAX_PREFIX_BYTES // 2 + 1), "longer than"),  # bytes, not characters
    ],
)
def test_unsafe_prefixes_are_refused(prefix: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_prefix(prefix)


def test_layout_names() -> None:
    layout = KeyLayout.under("/tenant/")
    k = encode_id("order/42")
    assert layout.root == "tenant/"
    assert layout.records_dir == "tenant/inv/"
    assert layout.record(k) == "tenant/inv/order~2F42"
    assert layout.entry(k, 3) == "tenant/ent/order~2F42/00000000000000000003"
    assert layout.entry(k, 3).startswith(layout.entries_dir(k))
    assert layout.segment(k, 50) == "tenant/seg/order~2F42/00000000000000000050"
    assert layout.segment(k, 50).startswith(layout.segments_dir(k))
    assert layout.status_dir(InvocationStatus.PENDING) == "tenant/status/pending/"
    assert (
        layout.status_marker(InvocationStatus.COMPLETED, k, 2)
        == "tenant/status/completed/order~2F42/00000000000000000002"
    )
    assert layout.probe().startswith("tenant/probe/")
    assert layout.probe() != layout.probe()
    assert KeyLayout.number_in(layout.entry(k, 7), layout.entries_dir(k)) == 7
    assert KeyLayout.under("").record(k) == "inv/order~2F42"


def test_one_invocations_directories_never_hold_anothers_keys() -> None:
    # "a" is a prefix of "ab" as a string, never as a directory: each ends with "/".
    layout = KeyLayout.under("p")
    a, ab = encode_id("a"), encode_id("ab")
    assert not layout.entry(ab, 0).startswith(layout.entries_dir(a))
    assert not layout.segment(ab, 2).startswith(layout.segments_dir(a))
    marker = layout.status_marker(InvocationStatus.PENDING, ab, 1)
    assert not marker.startswith(layout.status_dir(InvocationStatus.PENDING, a))


@given(inv_id=ids)
@settings(max_examples=100, deadline=None)
def test_every_key_fits_s3_and_its_prefix(inv_id: str) -> None:
    tenant = "/".join(["t" * 99] * 4)  # 399 bytes, within MAX_PREFIX_BYTES
    layout = KeyLayout.under(tenant)
    k = encode_id(inv_id)
    keys = [
        layout.record(k),
        layout.entry(k, MAX_INDEX),
        layout.segment(k, MAX_INDEX),
        *(layout.status_marker(status, k, MAX_INDEX) for status in InvocationStatus),
    ]
    for key in keys:
        assert key.startswith(tenant + "/")
        assert len(key.encode()) <= 1024
        rest = key[len(tenant) + 1 :].split("/")
        assert ".." not in rest and "." not in rest
