from __future__ import annotations

import pytest

from cdp_stream.resolver.identity import Identifier, identifiers_of, normalize, parse_ref


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "  ",
        "undefined",
        "NULL",
        "None",
        "nan",
        "anonymous",
        "Guest",
        "true",
        "FALSE",
        "[object Object]",
        "0",
        "-1",
        "000",
        "0-0-0",
        None,
        True,
        {"a": 1},
        ["x"],
    ],
)
def test_blocked_and_junk_values_never_link(raw: object) -> None:
    assert normalize("user_id", raw) is None


def test_values_are_trimmed_and_numbers_become_strings() -> None:
    assert normalize("user_id", "  u-1 ") == "u-1"
    assert normalize("user_id", 42) == "42"


def test_identifiers_in_priority_order_without_blocked_ones() -> None:
    event = {"userId": " u1 ", "anonymousId": "a1"}
    assert identifiers_of(event) == [Identifier("user_id", "u1"), Identifier("anonymous_id", "a1")]
    assert identifiers_of({"userId": "undefined", "anonymousId": "a1"}) == [
        Identifier("anonymous_id", "a1")
    ]
    assert identifiers_of({"userId": "null", "anonymousId": "0"}) == []


def test_parse_ref_normalizes_like_ingestion() -> None:
    assert parse_ref("user_id: u1 ") == Identifier("user_id", "u1")
    assert parse_ref("anonymous_id:a:b") == Identifier("anonymous_id", "a:b")
    assert parse_ref("nocolon") is None
    assert parse_ref("user_id:undefined") is None
