"""collector -> Kafka -> resolver -> Postgres -> profile API, on the real broker and server."""

from __future__ import annotations

import gzip
import uuid
from typing import Any

import httpx
import orjson

from tests.integration.conftest import AUTH, WRITE_KEY

BASIC = httpx.BasicAuth(WRITE_KEY, "")


def uid() -> str:
    return uuid.uuid4().hex[:12]


async def test_single_identify_lands_on_a_profile(
    client: httpx.AsyncClient, profile_of: Any
) -> None:
    user, anon = f"u-{uid()}", f"a-{uid()}"
    r = await client.post(
        "/v1/identify",
        json={"userId": user, "anonymousId": anon, "traits": {"plan": "pro", "name": "Ada"}},
        auth=BASIC,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    profile = await profile_of(f"user_id:{user}")
    assert profile is not None
    assert profile["traits"] == {"plan": "pro", "name": "Ada"}
    assert {"type": "anonymous_id", "value": anon} in profile["identities"]
    assert profile["computed"]["event_count"] == 1
    # the same person by the other identifier, and by profile id
    assert (await profile_of(f"anonymous_id:{anon}"))["id"] == profile["id"]
    assert (await profile_of(profile["id"]))["id"] == profile["id"]


async def test_write_key_in_body_works(client: httpx.AsyncClient, profile_of: Any) -> None:
    anon = f"a-{uid()}"
    r = await client.post(
        "/v1/page", json={"writeKey": WRITE_KEY, "anonymousId": anon, "name": "Home"}
    )
    assert r.status_code == 200, r.text
    assert await profile_of(f"anonymous_id:{anon}") is not None


def _batch(user: str, n: int) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "userId": user,
                "event": "Product Viewed",
                "messageId": f"{user}-{i}",
                "properties": {"i": i},
            }
            for i in range(n)
        ]
    }


async def test_batch_plain_and_gzip(client: httpx.AsyncClient, profile_of: Any) -> None:
    plain, zipped = f"u-{uid()}", f"u-{uid()}"
    r = await client.post("/v1/batch", json=_batch(plain, 3), auth=BASIC)
    assert r.status_code == 200, r.text
    body = gzip.compress(orjson.dumps(_batch(zipped, 4)))
    r = await client.post(
        "/v1/batch",
        content=body,
        auth=BASIC,
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    p1 = await profile_of(f"user_id:{plain}", until=lambda p: p["computed"]["event_count"] == 3)
    p2 = await profile_of(f"user_id:{zipped}", until=lambda p: p["computed"]["event_count"] == 4)
    assert p1 is not None and p2 is not None


async def test_redelivered_events_are_stored_once(
    client: httpx.AsyncClient, profile_of: Any
) -> None:
    user = f"u-{uid()}"
    for _ in range(3):  # a client retrying the same batch: same messageIds
        r = await client.post("/v1/batch", json=_batch(user, 5), auth=BASIC)
        assert r.status_code == 200
    marker = {"type": "track", "userId": user, "event": "Marker", "messageId": f"{user}-m"}
    assert (await client.post("/v1/track", json=marker, auth=BASIC)).status_code == 200
    # the marker is behind the retries in the same partition: once it counts, they all did
    profile = await profile_of(f"user_id:{user}", until=lambda p: p["computed"]["event_count"] >= 6)
    assert profile is not None and profile["computed"]["event_count"] == 6


async def test_unknown_profile_is_404_and_api_needs_a_token(client: httpx.AsyncClient) -> None:
    assert (
        await client.get("/v1/profiles/user_id:nobody-" + uid(), headers=AUTH)
    ).status_code == 404
    assert (await client.get(f"/v1/profiles/{uuid.uuid4()}", headers=AUTH)).status_code == 404
    assert (await client.get("/v1/profiles/user_id:x")).status_code == 401
    bad = {"authorization": "Bearer nope"}
    assert (await client.get("/v1/profiles/user_id:x", headers=bad)).status_code == 401
    # a write key is not an API token
    wk = {"authorization": f"Bearer {WRITE_KEY}"}
    assert (await client.get("/v1/profiles/user_id:x", headers=wk)).status_code == 401


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "bus": "ok", "database": "ok"}
