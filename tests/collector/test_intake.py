"""Intake: per-event validation, enrichment and rejection, without HTTP or a broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.collector._json import BadRequest
from cdp_stream.collector.intake import IntakeResult, body_write_key, channel_of, intake
from cdp_stream.events import Event, Rejection
from cdp_stream.identity import IdentityRules
from cdp_stream.settings import Settings

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings()


def run(body: Any, endpoint: str = "batch", **kw: Any) -> IntakeResult:
    args: dict[str, Any] = {
        "settings": SETTINGS,
        "rules": IdentityRules.from_settings(SETTINGS),
        "source_id": "src-1",
        "received_at": NOW,
        "ip": "203.0.113.9",
        "user_agent": "curl/8",
    }
    return intake(body, endpoint, **{**args, **kw})


def accepted(result: IntakeResult) -> list[dict[str, Any]]:
    return [orjson.loads(a.value) for a in result.accepted]


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_single_call_is_enriched() -> None:
    result = run({"userId": 42, "traits": {"plan": "pro"}, "writeKey": "wk"}, "identify")
    [event] = accepted(result)
    assert result.rejected == []
    assert event["type"] == "identify"
    assert event["userId"] == "42"  # ids are strings downstream
    assert "writeKey" not in event  # a credential is never stored with the data
    assert event["sourceId"] == "src-1"
    assert event["receivedAt"] == event["timestamp"] == iso(NOW)
    assert event["messageId"].startswith("cdp-")
    assert event["context"] == {"ip": "203.0.113.9", "userAgent": "curl/8"}
    assert event["channel"] == "other"
    assert result.accepted[0].key == b"user_id:42"
    Event.model_validate(event)  # what goes on cdp.events matches its published schema


def test_client_context_wins_over_request_headers() -> None:
    body = {"anonymousId": "a", "context": {"ip": "198.51.100.1", "userAgent": "Mozilla"}}
    [event] = accepted(run(body, "page"))
    assert event["context"] == {"ip": "198.51.100.1", "userAgent": "Mozilla"}
    assert event["channel"] == "website"


def test_the_endpoint_decides_the_type() -> None:
    [event] = accepted(run({"type": "identify", "userId": "u", "event": "Clicked"}, "track"))
    assert event["type"] == "track"


def test_unknown_keys_are_kept() -> None:
    [event] = accepted(run({"userId": "u", "event": "E", "_metadata": {"bundled": []}}, "track"))
    assert event["_metadata"] == {"bundled": []}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"type": "track", "event": "E"}, "an event needs a userId or an anonymousId"),
        ({"type": "track", "userId": "u"}, "event: Field required"),
        ({"type": "track", "userId": "u", "event": ""}, "event: String should have at least 1"),
        ({"type": "track", "userId": "u", "event": 5}, "event: Input should be a valid string"),
        ({"type": "identify", "userId": True}, "userId: must be a string or an integer"),
        ({"type": "identify", "userId": "u", "traits": []}, "traits: Input should be a valid"),
        ({"type": "identify", "userId": "u", "messageId": "m" * 101}, "messageId: String should"),
        ({"type": "identify", "userId": "x" * 256}, "userId: must be at most 255 characters"),
        ({"type": "identify", "userId": "u", "timestamp": 1700000000}, "timestamp: must be an"),
        ({"type": "identify", "userId": "u", "timestamp": "yesterday"}, "timestamp: Input should"),
        ({"type": "group", "userId": "u"}, "groupId: Field required"),
        ({"type": "alias", "userId": "u"}, "an alias needs previousId (or previousUserId)"),
        ({"type": "teleport", "userId": "u"}, "type: must be one of identify, track"),
        ({"userId": "u"}, "type: must be one of"),
        ({"type": "identify", "userId": "u", "context": {"externalIds": [{"id": 1}]}}, "type"),
        ("not an object", "an event must be a JSON object"),
        ({"type": "identify", "userId": "u", "traits": {"n": 2**53}}, "outside ±(2^53-1)"),
        ({"type": "identify", "userId": "u", "traits": {"n": -(2**70)}}, "outside ±(2^53-1)"),
        ({"type": "identify", "userId": "u", "traits": {"s": "a\x00b"}}, "\\u0000 (NUL)"),
        ({"type": "identify", "userId": "u", "traits": {"a\x00": 1}}, "\\u0000 (NUL)"),
        ({"type": "identify", "userId": "u", "traits": {"s": "\ud800"}}, "lone UTF-16 surrogate"),
    ],
)
def test_a_bad_event_is_rejected_and_the_others_accepted(event: Any, reason: str) -> None:
    good = {"type": "track", "userId": "u", "event": "Fine", "messageId": "ok-1"}
    result = run({"batch": [good, event, good | {"messageId": "ok-2"}]})
    assert [e["messageId"] for e in accepted(result)] == ["ok-1", "ok-2"]
    [rejected] = result.rejected
    assert rejected.index == 1
    assert reason in rejected.reason
    assert rejected.record is not None
    # the dead letter keeps the event as it came, even big integers and lone surrogates
    dead = Rejection.model_validate(json.loads(rejected.record))
    assert (dead.index, dead.reason, dead.sourceId, dead.endpoint) == (
        1,
        rejected.reason,
        "src-1",
        "batch",
    )
    assert dead.event == event


def test_a_literal_backslash_u0000_is_just_text() -> None:
    [event] = accepted(run({"userId": "u", "traits": {"s": "\\u0000"}}, "identify"))
    assert event["traits"]["s"] == "\\u0000"


def test_largest_safe_integer_is_accepted() -> None:
    [event] = accepted(
        run({"userId": "u", "traits": {"n": 2**53 - 1, "m": -(2**53 - 1)}}, "identify")
    )
    assert event["traits"] == {"n": 2**53 - 1, "m": -(2**53 - 1)}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ([], 400, "must be a JSON object"),
        ({"batch": {}}, 400, '"batch": an array'),
        ({}, 400, '"batch": an array'),
        ({"batch": [{}] * 2501}, 400, "over the 2500-event limit"),
        ({"batch": [], "sentAt": 5}, 400, "invalid batch: sentAt"),
    ],
)
def test_request_level_problems_refuse_the_whole_request(
    body: Any, status: int, message: str
) -> None:
    with pytest.raises(BadRequest) as info:
        run(body)
    assert (info.value.status, message in info.value.message) == (status, True)


def test_oversize_events() -> None:
    big = {"userId": "u", "traits": {"blob": "x" * 33_000}}
    with pytest.raises(BadRequest) as info:
        run(big, "identify")
    assert info.value.status == 413
    assert "over the 32768-byte limit" in info.value.message
    # in a batch the oversize event is refused (never published anywhere), the rest accepted
    result = run({"batch": [big | {"type": "identify"}, {"type": "identify", "userId": "v"}]})
    assert [e["userId"] for e in accepted(result)] == ["v"]
    [rejected] = result.rejected
    assert rejected.index == 0 and rejected.record is None
    assert "32768-byte limit" in rejected.reason


def test_batch_defaults_apply_under_each_events_own_values() -> None:
    body = {
        "context": {"library": {"name": "analytics-python"}, "locale": "en"},
        "integrations": {"All": True},
        "sentAt": iso(NOW),
        "batch": [
            {"type": "track", "userId": "u", "event": "A", "context": {"locale": "fr"}},
            {"type": "track", "userId": "u", "event": "B", "integrations": {"All": False}},
        ],
    }
    a, b = accepted(run(body))
    assert a["context"]["locale"] == "fr" and a["context"]["library"]["name"] == "analytics-python"
    assert b["context"]["locale"] == "en"
    assert (a["integrations"], b["integrations"]) == ({"All": True}, {"All": False})
    assert a["sentAt"] == iso(NOW)


@given(
    skew=st.integers(-86_400 * 30, 86_400 * 30),
    age=st.integers(0, 86_400 * 365),
)
def test_clock_skew_is_removed(skew: int, age: int) -> None:
    """A client clock ``skew`` seconds off: what it reports shifts, the result does not."""
    happened = NOW - timedelta(seconds=age)
    client_now = NOW + timedelta(seconds=skew)
    body = {
        "userId": "u",
        "event": "E",
        "timestamp": iso(happened + timedelta(seconds=skew)),
        "sentAt": iso(client_now),
    }
    [event] = accepted(run(body, "track"))
    assert event["timestamp"] == iso(happened)
    assert event["originalTimestamp"] == body["timestamp"]
    assert "flags" not in event


@pytest.mark.parametrize(
    "when",
    [
        NOW + timedelta(days=1, seconds=1),
        datetime(1999, 12, 31, 23, 59, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_untrusted_timestamps_are_replaced_and_flagged(when: datetime) -> None:
    [event] = accepted(run({"userId": "u", "event": "E", "timestamp": iso(when)}, "track"))
    assert event["timestamp"] == iso(NOW)
    assert event["flags"] == ["timestamp_untrusted"]
    assert event["originalTimestamp"] == iso(when)  # what the client said is kept


def test_a_client_cannot_set_server_flags() -> None:
    [event] = accepted(
        run({"userId": "u", "event": "E", "flags": ["timestamp_untrusted"]}, "track")
    )
    assert "flags" not in event


def test_naive_and_offset_timestamps_are_utc() -> None:
    [naive] = accepted(
        run({"userId": "u", "event": "E", "timestamp": "2026-04-30T10:00:00"}, "track")
    )
    [offset] = accepted(
        run({"userId": "u", "event": "E", "timestamp": "2026-04-30T12:00:00+02:00"}, "track")
    )
    assert naive["timestamp"] == offset["timestamp"] == "2026-04-30T10:00:00.000000Z"


def test_generated_message_ids_dedupe_retries_only_when_the_client_timed_the_event() -> None:
    timed = {"userId": "u", "event": "E", "timestamp": "2026-04-30T10:00:00Z"}
    first, again = accepted(run(timed, "track"))[0], accepted(run(timed, "track"))[0]
    assert first["messageId"] == again["messageId"]
    other_source = accepted(run(timed, "track", source_id="src-2"))[0]
    assert other_source["messageId"] != first["messageId"]
    untimed = {"userId": "u", "event": "E"}
    assert (
        accepted(run(untimed, "track"))[0]["messageId"]
        != accepted(run(untimed, "track"))[0]["messageId"]
    )


@pytest.mark.parametrize(
    ("event", "channel"),
    [
        ({"type": "track", "event": "Order Completed"}, "purchase"),
        ({"type": "track", "event": "product added"}, "purchase"),
        ({"type": "track", "event": "Email Opened"}, "email"),
        ({"type": "track", "event": "Unsubscribed"}, "email"),
        ({"type": "page"}, "website"),
        (
            {"type": "track", "event": "Signed Up", "context": {"page": {"url": "https://x"}}},
            "website",
        ),
        ({"type": "screen", "name": "Home"}, "other"),
        ({"type": "identify"}, "other"),
    ],
)
def test_channel(event: dict[str, Any], channel: str) -> None:
    assert channel_of(event) == channel


def test_routing_key_keeps_a_browser_together() -> None:
    """Before and after sign-in, and the sign-in itself: the browser's partition."""
    result = run(
        {
            "batch": [
                {"type": "page", "anonymousId": "a"},
                {"type": "identify", "userId": "u", "anonymousId": "a"},
                {"type": "track", "userId": "u", "anonymousId": "a", "event": "E"},
                {"type": "track", "userId": "u", "event": "Order Completed"},
            ]
        }
    )
    assert [a.key for a in result.accepted] == [b"anonymous_id:a"] * 3 + [b"user_id:u"]


def test_routing_passes_over_ids_that_never_link() -> None:
    result = run(
        {
            "batch": [
                {"type": "track", "userId": "undefined", "anonymousId": "a", "event": "E"},
                {"type": "track", "userId": "u", "anonymousId": "undefined", "event": "E"},
                {
                    "type": "identify",
                    "userId": "null",
                    "anonymousId": "0",
                    "traits": {"email": " Ada@Example.com"},
                },
                {"type": "track", "anonymousId": "undefined", "event": "E", "messageId": "m1"},
                {"type": "track", "anonymousId": "undefined", "event": "E", "messageId": "m2"},
            ]
        }
    )
    assert [a.key for a in result.accepted] == [
        b"anonymous_id:a",
        b"user_id:u",
        b"email:ada@example.com",
        b"message_id:m1",  # nobody to keep together: spread, not piled on one partition
        b"message_id:m2",
    ]


def test_body_write_key() -> None:
    assert body_write_key({"writeKey": "wk"}) == "wk"
    assert body_write_key({"writeKey": ""}) is None
    assert body_write_key({"writeKey": 5}) is None
    assert body_write_key([]) is None
