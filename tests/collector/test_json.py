"""Strict JSON: every hostile body is a 400 with a message naming the problem, and the
fast path (orjson) answers exactly what the reference (the stdlib) answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.collector._json import (
    _SLOW,
    BadRequest,
    _fast,
    _loads_stdlib,
    _too_deep,
    loads_strict,
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"batch": [{"x": {"k": 1, "k": 1}}]}', "duplicate key 'k'"),
        (b'{"a": 1, "a": 2, "b": "\\u003a"}', "duplicate key 'a'"),  # ":" escaped: not counted
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


class Pairs(list[tuple[str, Any]]):
    """A JSON object as written, duplicate keys and all."""


KEYS = st.sampled_from(["a", "b", ":", "a:b", "é", "\x00", "\\", '"', "😀"]) | st.text(max_size=4)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | KEYS
)
TREES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.lists(st.tuples(KEYS, inner), max_size=4).map(Pairs)
    ),
    max_leaves=25,
)


def write(node: Any, ascii_only: bool, escape_colons: bool, colon: str) -> str:
    """JSON text for ``node`` in one of the ways clients write it."""

    def scalar(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=ascii_only)
        return text.replace(":", "\\u003a") if escape_colons else text

    if isinstance(node, Pairs):
        members = (scalar(k) + colon + write(v, ascii_only, escape_colons, colon) for k, v in node)
        return "{" + ",".join(members) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(write(v, ascii_only, escape_colons, colon) for v in node) + "]"
    return scalar(node)


def outcome(parse: Any) -> str:
    """What a parse gives, exactly: repr tells 1, 1.0 and True apart."""
    try:
        return "value " + repr(parse())
    except BadRequest as exc:
        return f"refused {exc.status} {exc.message}"


def reference(body: bytes, max_depth: int) -> Any:
    value = _loads_stdlib(body, max_depth)
    if _too_deep(value, max_depth):
        raise BadRequest(400, f"JSON nested deeper than {max_depth} levels")
    return value


@given(TREES, st.booleans(), st.booleans(), st.sampled_from([":", ": ", " :\n"]))
def test_the_fast_path_answers_what_the_stdlib_answers(
    tree: Any, ascii_only: bool, escape_colons: bool, colon: str
) -> None:
    body = write(tree, ascii_only, escape_colons, colon).encode("utf-8", "surrogatepass")
    assert outcome(lambda: loads_strict(body, 4)) == outcome(lambda: reference(body, 4))


def test_the_fast_path_takes_what_clients_send_and_leaves_what_it_cannot_decide() -> None:
    event = {"type": "track", "event": "Clicked", "properties": {"url": "https://x.io/a:b"}}
    assert _fast(json.dumps({"batch": [event] * 3}).encode()) != _SLOW
    assert _fast(b'{"a": 1, "a": 1}') is _SLOW  # a duplicate key
    assert _fast(b'{"a": 1, "\\u0061": 1}') is _SLOW  # the same key, escaped
    assert _fast(b'{"a": 1, "b": "\\u003a"}') is _SLOW  # a colon the count cannot see
    assert _fast(b'{"n": 18446744073709551616}') is _SLOW  # past 64 bits: orjson says float
