"""Strict JSON: every hostile body is a 400 with a message naming the problem."""

from __future__ import annotations

import pytest

from cdp_stream.collector._json import BadRequest, loads_strict


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"batch": [{"x": {"k": 1, "k": 1}}]}', "duplicate key 'k'"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"a": 1e999}', "out of range"),
        (b'{"a": ', "malformed JSON"),
        (b"", "malformed JSON"),
        (b"{'a': 1}", "malformed JSON"),
        (b'{"a": 1} trailing', "malformed JSON"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b'\xef\xbb\xbf{"a": 1}', "malformed JSON"),  # a BOM is not JSON (RFC 8259)
    ],
)
def test_hostile_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        loads_strict(body, max_depth=32)
    assert info.value.status == 400
    assert message in info.value.message


def test_depth_limit_counts_every_container() -> None:
    assert loads_strict(b"[[[{}]]]", max_depth=4) == [[[{}]]]
    with pytest.raises(BadRequest, match="deeper than 3"):
        loads_strict(b"[[[{}]]]", max_depth=3)
    with pytest.raises(BadRequest, match="deeper than 3"):
        loads_strict(b'{"a": 1, "b": {"c": [1, {"d": 2}]}}', max_depth=3)


def test_nesting_past_the_parser_recursion_limit_is_a_400_not_a_crash() -> None:
    with pytest.raises(BadRequest, match="deeper than 32"):
        loads_strict(b"[" * 100_000 + b"]" * 100_000, max_depth=32)


def test_values_kept_exact() -> None:
    """Big integers survive parsing exactly; the intake decides what to do with them."""
    body = b'{"big": 123456789012345678901234567890, "s": "a\\u0000b", "f": 1.5}'
    assert loads_strict(body, max_depth=32) == {
        "big": 123456789012345678901234567890,
        "s": "a\x00b",
        "f": 1.5,
    }
