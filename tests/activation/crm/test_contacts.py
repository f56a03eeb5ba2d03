"""What a profile is as a CRM contact (:mod:`cdp_stream.activation.crm.contacts`):
pure, no database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from cdp_stream.activation.crm import contacts as crm
from cdp_stream.identity import IdentityRules
from cdp_stream.settings import Settings

RULES = IdentityRules.from_settings(Settings())


def at(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


def test_contact_of_fields_and_stages() -> None:
    ids = {"email": ["old@example.com", "new@example.com"], "phone": ["+15550100"]}
    c = crm.contact_of(
        {
            "email": " NEW@example.com",
            "name": "Ada King Lovelace",
            "company": {"name": "Engines Ltd"},
            "jobTitle": "CTO",
        },
        {
            "first_touch": {"referrer": "https://news.example"},
            "last_seen": "2024-03-01T10:00:00.000000Z",
        },
        ids,
        RULES,
        lead=False,
        stage_before=None,
    )
    assert c == {
        "email": "new@example.com",  # the one the traits name
        "phone": "+15550100",
        "user_id": None,
        "first_name": "Ada",
        "last_name": "King Lovelace",
        "company": "Engines Ltd",
        "job_title": "CTO",
        "lifecycle_stage": "subscriber",
        "first_touch_source": "https://news.example",
        "last_activity_at": at("2024-03-01T10:00:00Z"),
    }
    traits = {"firstName": "Grace", "name": "G Hopper", "company": "Navy", "title": " "}
    c = crm.contact_of(
        traits, {}, {"email": ["x@example.com"]}, RULES, lead=True, stage_before=None
    )
    assert c is not None
    assert (c["first_name"], c["last_name"], c["company"], c["job_title"]) == (
        "Grace",
        "Hopper",
        "Navy",
        None,
    )
    assert c["lifecycle_stage"] == "lead"
    ordered = {"order_count": 1}
    assert (
        crm.contact_of({}, ordered, {"user_id": ["u"]}, RULES, lead=False, stage_before=None)[
            "lifecycle_stage"
        ]
        == "customer"
    )
    # never downgrades
    again = crm.contact_of({}, {}, {"user_id": ["u"]}, RULES, lead=False, stage_before="customer")
    assert again is not None and again["lifecycle_stage"] == "customer"
    # an anonymous or phone-only profile is no contact
    assert (
        crm.contact_of(
            {"email": "a@b.c"}, {}, {"phone": ["+1555"]}, RULES, lead=True, stage_before=None
        )
        is None
    )


def test_a_contact_is_written_only_when_a_field_changed() -> None:
    c = crm.contact_of({}, {}, {"email": ["a@example.com"]}, RULES, lead=False, stage_before=None)
    assert c is not None
    assert not crm.unchanged(None, c, 300)  # new
    stored = {**c, "profile_id": uuid.uuid4(), "created_at": at("2024-01-01T00:00:00Z")}
    assert crm.unchanged(stored, c, 300)  # bookkeeping columns do not count
    assert not crm.unchanged({**stored, "lifecycle_stage": "lead"}, c, 300)


def test_last_activity_alone_is_written_once_it_moved_the_resolution() -> None:
    seen = {"last_seen": "2024-03-01T10:00:00Z"}
    stored = crm.contact_of({}, seen, {"email": ["a@b.co"]}, RULES, lead=False, stage_before=None)
    assert stored is not None

    def later(at_: str, **traits: str) -> dict[str, Any]:
        c = crm.contact_of(
            traits, {"last_seen": at_}, {"email": ["a@b.co"]}, RULES, lead=False, stage_before=None
        )
        assert c is not None
        return c

    assert crm.unchanged(stored, later("2024-03-01T10:04:59Z"), 300)
    assert not crm.unchanged(stored, later("2024-03-01T10:05:00Z"), 300)
    assert not crm.unchanged(stored, later("2024-03-01T10:00:01Z"), 0)  # exact
    # any other field still counts at once, and carries the newer activity with it
    assert not crm.unchanged(stored, later("2024-03-01T10:00:01Z", firstName="Ada"), 300)
    assert not crm.unchanged(
        {**stored, "last_activity_at": None}, later("2024-03-01T10:00:01Z"), 300
    )


def test_only_an_order_makes_a_customer() -> None:
    assert crm.is_customer({"order_count": 2})
    assert not crm.is_customer({"order_count": 0})
    assert not crm.is_customer({"order_count": "3"})  # not a count the resolver writes
    assert not crm.is_customer({})


def test_contact_json_shows_times_as_iso_8601() -> None:
    pid = uuid.uuid4()
    c = crm.contact_of(
        {},
        {"last_seen": "2024-03-01T10:00:00Z"},
        {"user_id": ["u"]},
        RULES,
        lead=False,
        stage_before=None,
    )
    assert c is not None
    shown = crm.contact_json(pid, {**c, "created_at": at("2024-03-02T00:00:00Z")})
    assert shown["profile_id"] == str(pid)
    assert shown["last_activity_at"] == "2024-03-01T10:00:00+00:00"
    assert shown["created_at"] == "2024-03-02T00:00:00+00:00"
    assert shown["updated_at"] is None
    assert set(shown) == {"profile_id", *crm.CONTACT_FIELDS, "created_at", "updated_at"}
