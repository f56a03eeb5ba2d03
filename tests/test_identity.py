"""Identifier extraction and normalization, with the default rules from Settings."""

from __future__ import annotations

import pytest

from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.settings import Settings

RULES = IdentityRules.from_settings(Settings())


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
    assert RULES.normalize("user_id", raw) is None


def test_blocked_values_are_configurable() -> None:
    rules = IdentityRules.from_settings(Settings(identity_blocked_values=["Test-User"]))
    assert rules.normalize("user_id", "test-user") is None
    assert rules.normalize("user_id", "undefined") == "undefined"
    assert rules.normalize("user_id", "000") is None  # ^[0-]*$ always applies


def test_values_are_normalized_per_type() -> None:
    assert RULES.normalize("user_id", "  u-1 ") == "u-1"
    assert RULES.normalize("user_id", 42) == "42"
    assert RULES.normalize("email", " Ada@Example.COM ") == "ada@example.com"
    assert RULES.normalize("phone", "+1 (415) 555-0123") == "+14155550123"
    assert RULES.normalize("phone", " 555 0123 ") == "555 0123"  # no region: kept, trimmed
    german = IdentityRules.from_settings(Settings(phone_default_region="DE"))
    assert german.normalize("phone", "030 1234567") == "+49301234567"


def test_a_phone_number_is_normalized_per_region_however_often_it_comes() -> None:
    """Parsed numbers are cached: by number and region, never one region's for another."""
    german = IdentityRules.from_settings(Settings(phone_default_region="DE"))
    for _ in range(3):
        assert RULES.normalize("phone", "030 1234567") == "030 1234567"  # no region: kept
        assert german.normalize("phone", "030 1234567") == "+49301234567"


def test_every_identifier_source_in_priority_order() -> None:
    event = {
        "userId": " u1 ",
        "anonymousId": "a1",
        "traits": {"email": "Ada@Example.com", "phone": "+44 20 7946 0958"},
        "context": {
            "traits": {"email": "ada@work.example"},
            "device": {"id": "dev-1", "advertisingId": "ad-1"},
            "externalIds": [
                {"id": "zd-9", "type": "Zendesk"},
                {"id": "ADA@EXAMPLE.COM", "type": "email"},
                {"id": "x", "type": " "},
                "junk",
            ],
        },
    }
    assert RULES.identifiers_of(event) == [
        Identifier("user_id", "u1"),
        Identifier("email", "ada@example.com"),
        Identifier("email", "ada@work.example"),
        Identifier("phone", "+442079460958"),
        Identifier("anonymous_id", "a1"),
        Identifier("device_id", "dev-1"),
        Identifier("advertising_id", "ad-1"),
        Identifier("zendesk", "zd-9"),
    ]


def test_blocked_ids_are_skipped_and_priority_is_configurable() -> None:
    assert RULES.identifiers_of({"userId": "undefined", "anonymousId": "a1"}) == [
        Identifier("anonymous_id", "a1")
    ]
    assert RULES.identifiers_of({"userId": "null", "anonymousId": "0"}) == []
    rules = IdentityRules.from_settings(Settings(identity_priority=["anonymous_id"]))
    assert [i.type for i in rules.identifiers_of({"userId": "u", "anonymousId": "a"})] == [
        "anonymous_id",
        "user_id",
    ]


def test_limits_default_to_one_user_id_and_five_of_the_rest() -> None:
    assert RULES.limit("user_id") == 1
    assert RULES.limit("email") == 5
    assert RULES.limit("crm_id") == 5
    assert IdentityRules.from_settings(Settings(identity_limits={"email": 2})).limit("email") == 2


def test_parse_ref_normalizes_like_ingestion() -> None:
    assert RULES.parse_ref("user_id: u1 ") == Identifier("user_id", "u1")
    assert RULES.parse_ref("anonymous_id:a:b") == Identifier("anonymous_id", "a:b")
    assert RULES.parse_ref("email:Ada@Example.com") == Identifier("email", "ada@example.com")
    assert RULES.parse_ref("Zendesk:zd-9") == Identifier("zendesk", "zd-9")
    assert RULES.parse_ref("nocolon") is None
    assert RULES.parse_ref("user_id:undefined") is None
