"""Bad input over HTTP on the real broker and server: every case gets its status and
message, the valid events beside a bad one still land in Postgres, and each rejected event
is on ``cdp.events.rejected`` with its reason."""

from __future__ import annotations

import gzip
import json
import uuid
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from cdp_stream.app import Runtime
from cdp_stream.bus.base import next_offsets
from tests.integration.conftest import WRITE_KEY
from tests.support import eventually

BASIC = httpx.BasicAuth(WRITE_KEY, "")
JSON = {"content-type": "application/json"}


def uid() -> str:
    return uuid.uuid4().hex[:12]


async def post_raw(
    client: httpx.AsyncClient, endpoint: str, body: bytes, **headers: str
) -> httpx.Response:
    return await client.post(
        f"/v1/{endpoint}", content=body, auth=BASIC, headers={**JSON, **headers}
    )


async def dead_letters(runtime: Runtime, marker: str, expected: int) -> list[dict[str, Any]]:
    """The rejection records whose event mentions ``marker`` (read by a fresh group)."""
    consumer = runtime.bus.consumer(f"test-dlq-{uid()}", [runtime.settings.topics.rejected])
    await consumer.start()
    found: list[dict[str, Any]] = []

    async def probe() -> bool:
        messages = await consumer.getmany(10_000, 200)
        await consumer.commit(next_offsets(messages))
        letters = [json.loads(m.value) for m in messages]  # stdlib: lone surrogates too
        found.extend(d for d in letters if marker in (d["messageId"] or ""))
        return len(found) >= expected

    try:
        await eventually(probe)
    finally:
        await consumer.stop()
    return found


async def stored(runtime: Runtime, message_ids: list[str]) -> dict[str, dict[str, Any]]:
    async def probe() -> dict[str, dict[str, Any]] | None:
        async with runtime.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT message_id, payload FROM events WHERE message_id = ANY(:ids)"),
                    {"ids": message_ids},
                )
            ).all()
        return {r[0]: r[1] for r in rows} if len(rows) == len(message_ids) else None

    result: dict[str, dict[str, Any]] | None = await eventually(probe)
    assert result is not None, f"not all of {message_ids} were stored"
    return result


@pytest.mark.parametrize(
    ("endpoint", "body", "headers", "status", "message"),
    [
        ("track", b'{"userId": "u", "event": "E"', {}, 400, "malformed JSON"),
        ("track", b'{"userId": "u", "event": "E", "n": NaN}', {}, 400, "NaN is not valid JSON"),
        ("track", b'{"userId": "u", "event": "E", "n": Infinity}', {}, 400, "Infinity"),
        (
            "track",
            b'{"userId": "u", "userId": "v", "event": "E"}',
            {},
            400,
            "duplicate key 'userId'",
        ),
        (
            "track",
            b'{"userId": "u", "event": "E", "p": ' + b"[" * 40 + b"]" * 40 + b"}",
            {},
            400,
            "deeper than 32",
        ),
        ("track", b'{"userId": "\xc3\x28"}', {}, 400, "not valid UTF-8"),
        ("track", b"[1, 2]", {}, 400, "must be a JSON object"),
        ("batch", b'{"batch": "nope"}', {}, 400, '"batch": an array'),
        ("batch", orjson.dumps({"batch": [{}] * 2501}), {}, 400, "over the 2500-event limit"),
        (
            "track",
            b'{"userId":"u","event":"E","p":"' + b"x" * 600_000 + b'"}',
            {},
            413,
            "512000-byte limit",
        ),
        (
            "batch",
            gzip.compress(b'{"batch": [' + b" " * 2_000_000 + b"]}"),
            {"content-encoding": "gzip"},
            413,
            "decompressed request body over the 512000-byte limit",
        ),
        ("batch", b"not gzip at all", {"content-encoding": "gzip"}, 400, "invalid gzip body"),
        (
            "batch",
            gzip.compress(b'{"batch": []}')[:-12],
            {"content-encoding": "gzip"},
            400,
            "truncated gzip",
        ),
        ("batch", b'{"batch": []}', {"content-encoding": "br"}, 415, "use gzip"),
        (
            "identify",
            orjson.dumps({"userId": "u", "traits": {"blob": "x" * 40_000}}),
            {},
            413,
            "over the 32768-byte limit",
        ),
        ("track", b'{"userId": "u"}', {}, 400, "event: Field required"),
    ],
)
async def test_request_refused_with_status_and_message(
    client: httpx.AsyncClient,
    endpoint: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    r = await post_raw(client, endpoint, body, **headers)
    assert r.status_code == status, r.text
    assert r.json()["success"] is False
    assert message in r.json()["error"]


async def test_missing_or_unknown_write_key_is_401(client: httpx.AsyncClient) -> None:
    body = {"userId": "u", "event": "E"}
    assert (await client.post("/v1/track", json=body)).status_code == 401
    r = await client.post("/v1/track", json=body, auth=httpx.BasicAuth("wk_nope", ""))
    assert r.status_code == 401 and "write key" in r.json()["error"]
    r = await client.post("/v1/track", json=body | {"writeKey": "wk_nope"})
    assert r.status_code == 401


async def test_bad_events_rejected_the_rest_stored(
    client: httpx.AsyncClient, pipeline: Runtime
) -> None:
    run = uid()
    good = [
        {
            "type": "track",
            "userId": f"u-{run}",
            "event": "Order Completed",
            "messageId": f"{run}-ok-{i}",
        }
        for i in range(2)
    ]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"type": "track", "event": "E"}, "an event needs a userId or an anonymousId"),
        ({"type": "track", "userId": "u"}, "event: Field required"),
        ({"type": "identify", "userId": ["u"]}, "userId: must be a string or an integer"),
        ({"type": "identify", "userId": "u", "traits": {"s": "a\x00b"}}, "\\u0000 (NUL)"),
        ({"type": "identify", "userId": "u", "traits": {"n": 2**60}}, "outside ±(2^53-1)"),
        ({"type": "launch", "userId": "u"}, "type: must be one of"),
        ({"type": "identify", "userId": "u", "traits": {"blob": "x" * 40_000}}, "32768-byte limit"),
    ]
    for i, (event, _) in enumerate(bad):
        event["messageId"] = f"{run}-bad-{i}"
    long_id = {"type": "track", "userId": "u", "event": "E", "messageId": f"{run}-" + "m" * 100}
    surrogate = (
        b'{"type": "identify", "userId": "u", "messageId": "'
        + f"{run}-sur".encode()
        + b'", "traits": {"s": "\\ud800"}}'
    )
    items = (
        [orjson.dumps(good[0])]
        + [orjson.dumps(e) for e, _ in bad]
        + [orjson.dumps(long_id), surrogate, orjson.dumps(good[1])]
    )
    body = b'{"batch": [' + b",".join(items) + b"]}"
    r = await post_raw(client, "batch", body)
    assert r.status_code == 200, r.text
    rejected = r.json()["rejected"]
    assert r.json()["success"] is True
    reasons = {x["index"]: x["reason"] for x in rejected}
    assert set(reasons) == set(range(1, len(bad) + 3))
    for i, (_, reason) in enumerate(bad, start=1):
        assert reason in reasons[i]
    assert "messageId: String should have at most 100 characters" in reasons[len(bad) + 1]
    assert "lone UTF-16 surrogate" in reasons[len(bad) + 2]

    rows = await stored(pipeline, [e["messageId"] for e in good])
    assert all(p["channel"] == "purchase" for p in rows.values())
    # the dead letters: all but the oversize event, which never reaches Kafka
    letters = await dead_letters(pipeline, run, expected=len(bad) + 1)
    assert {d["index"] for d in letters} == set(range(1, len(bad) + 3)) - {len(bad)}
    assert all(d["reason"] == reasons[d["index"]] for d in letters)
    by_index = {d["index"]: d for d in letters}
    assert by_index[4]["event"]["traits"]["s"] == "a\x00b"  # the event as it came


async def test_a_rejected_single_call_is_400_and_dead_lettered(
    client: httpx.AsyncClient, pipeline: Runtime
) -> None:
    run = uid()
    r = await client.post("/v1/group", json={"userId": "u", "messageId": f"{run}-g"}, auth=BASIC)
    assert r.status_code == 400
    assert r.json()["error"] == "groupId: Field required"
    [letter] = await dead_letters(pipeline, run, expected=1)
    assert letter["endpoint"] == "group" and letter["event"] == {
        "userId": "u",
        "messageId": f"{run}-g",
    }


async def test_untrusted_time_and_unknown_keys_are_stored(
    client: httpx.AsyncClient, pipeline: Runtime
) -> None:
    run = uid()
    future = {
        "userId": f"u-{run}",
        "event": "E",
        "messageId": f"{run}-f",
        "timestamp": "2999-01-01T00:00:00Z",
        "custom": {"k": 1},
    }
    assert (await client.post("/v1/track", json=future, auth=BASIC)).status_code == 200
    payload = (await stored(pipeline, [f"{run}-f"]))[f"{run}-f"]
    assert payload["flags"] == ["timestamp_untrusted"]
    assert payload["timestamp"] == payload["receivedAt"]
    assert payload["originalTimestamp"] == "2999-01-01T00:00:00Z"
    assert payload["custom"] == {"k": 1}
    assert payload["context"]["ip"] == "203.0.113.7"


async def test_text_plain_is_read_as_json_and_an_unlisted_origin_is_403(
    client: httpx.AsyncClient, pipeline: Runtime
) -> None:
    refused, accepted = f"origin-{uid()}", f"plain-{uid()}"
    beacon = {"type": "track", "userId": "u", "event": "E"}
    plain = {"content-type": "text/plain;charset=UTF-8"}
    r = await client.post(
        "/v1/batch",
        content=orjson.dumps({"batch": [{**beacon, "messageId": refused}], "writeKey": WRITE_KEY}),
        headers={**plain, "origin": "https://not-listed.example"},  # this source lists none
    )
    assert r.status_code == 403 and "may not send to this source" in r.json()["error"]
    assert "access-control-allow-origin" not in r.headers
    r = await client.post(
        "/v1/batch",
        content=orjson.dumps({"batch": [{**beacon, "messageId": accepted}], "writeKey": WRITE_KEY}),
        headers=plain,  # no Origin: a server
    )
    assert r.status_code == 200, r.text
    assert set(await stored(pipeline, [accepted])) == {accepted}
    async with pipeline.engine.connect() as conn:
        query = text("SELECT count(*) FROM events WHERE message_id = :id")
        assert (await conn.execute(query, {"id": refused})).scalar_one() == 0


# Extreme client clocks: the skew correction, or the conversion to UTC, leaves the dates.
EXTREME_CLOCKS = [
    (
        {"originalTimestamp": "9999-12-31T23:59:59Z", "sentAt": "0001-01-01T00:00:00Z"},
        "the clock-skew correction",
    ),
    ({"timestamp": "0001-01-01T00:00:00+01:00"}, "timestamp: is out of range once converted"),
    ({"sentAt": "9999-12-31T23:59:59-01:00"}, "sentAt: is out of range once converted"),
]


@pytest.mark.parametrize(("clock", "reason"), EXTREME_CLOCKS)
async def test_an_extreme_client_clock_is_400_with_its_reason(
    client: httpx.AsyncClient, pipeline: Runtime, clock: dict[str, str], reason: str
) -> None:
    run = uid()
    event = {"event": "x", "anonymousId": "a", "messageId": f"{run}-t", **clock}
    r = await client.post("/v1/track", json=event, auth=BASIC)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]
    [letter] = await dead_letters(pipeline, run, expected=1)
    assert reason in letter["reason"]


async def test_an_extreme_client_clock_in_a_batch_rejects_that_event_only(
    client: httpx.AsyncClient, pipeline: Runtime
) -> None:
    run = uid()
    good = {"type": "track", "event": "x", "anonymousId": f"a-{run}", "messageId": f"{run}-ok"}
    bad = [
        {"type": "track", "event": "x", "anonymousId": "a", "messageId": f"{run}-{i}", **clock}
        for i, (clock, _) in enumerate(EXTREME_CLOCKS)
    ]
    r = await client.post("/v1/batch", json={"batch": [good, *bad]}, auth=BASIC)
    assert r.status_code == 200, r.text
    reasons = {x["index"]: x["reason"] for x in r.json()["rejected"]}
    assert set(reasons) == {1, 2, 3}
    for index, (_, reason) in enumerate(EXTREME_CLOCKS, start=1):
        assert reason in reasons[index]
    await stored(pipeline, [f"{run}-ok"])


UNSAFE = 123456789012345678901234567890


@pytest.mark.parametrize(
    ("endpoint", "event", "field"),
    [
        ("group", {"userId": "u", "groupId": UNSAFE}, "groupId"),
        ("group", {"userId": UNSAFE, "groupId": "g"}, "userId"),
        ("track", {"anonymousId": -(2**53), "event": "E"}, "anonymousId"),
        ("alias", {"userId": "u", "previousUserId": 2**53}, "previousUserId"),
        (
            "identify",
            {"userId": "u", "context": {"externalIds": [{"id": 2**64, "type": "c"}]}},
            "context.externalIds.0.id",
        ),
    ],
)
async def test_an_integer_id_beyond_2_53_is_refused(
    client: httpx.AsyncClient, endpoint: str, event: dict[str, Any], field: str
) -> None:
    """JavaScript clients have already rounded such a number: its string names someone
    else. The README promises integers beyond ±(2^53-1) are rejected."""
    r = await post_raw(client, endpoint, json.dumps(event).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"{field}: an integer id must be within ±(2^53-1)")


async def test_the_largest_safe_integer_id_is_kept_exact(
    client: httpx.AsyncClient, pipeline: Runtime
) -> None:
    run = uid()
    event = {"userId": f"u-{run}", "groupId": 2**53 - 1, "messageId": f"{run}-g"}
    assert (await client.post("/v1/group", json=event, auth=BASIC)).status_code == 200
    payload = (await stored(pipeline, [f"{run}-g"]))[f"{run}-g"]
    assert payload["groupId"] == str(2**53 - 1)
