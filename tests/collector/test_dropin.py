"""What analytics.js 2.0 and RudderStack's SDK v3 fetch at load, and the paths they post
to, answered as those libraries read them (real Postgres for the sources; a recording
memory bus shows what was published). The libraries themselves, in Chromium:
``test_dropin_browser``."""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest

from cdp_stream.collector.cors import ALLOWED_REQUEST_HEADERS
from tests.collector.conftest import SHOP
from tests.support import uid

OTHER = "https://other.example.net"


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def test_analytics_js_settings_name_the_collector_as_the_one_integration(
    web: tuple,
) -> None:
    client, _, key = web
    r = await client.get(f"/v1/projects/{key}/settings", headers={"origin": SHOP})
    assert r.status_code == 200
    assert r.json() == {
        "integrations": {
            "Segment.io": {"apiKey": key, "apiHost": "cdp.test/v1", "protocol": "http"}
        },
        "metrics": {"sampleRate": 0},  # analytics.js sends no usage metrics
    }
    assert r.headers["access-control-allow-origin"] == SHOP
    behind_tls = await client.get(f"https://cdp.example.com/v1/projects/{key}/settings")
    assert behind_tls.json()["integrations"]["Segment.io"] == {
        "apiKey": key,
        "apiHost": "cdp.example.com/v1",
        "protocol": "https",
    }
    assert "access-control-allow-origin" not in behind_tls.headers  # no Origin: no CORS


@pytest.mark.parametrize("path", ["/sourceConfig/", "/sourceConfig"])
async def test_rudderstack_source_config_is_the_enabled_source_without_destinations(
    web: tuple, path: str
) -> None:
    client, _, key = web
    query = {"p": "npm", "v": "3.34.1", "build": "modern", "writeKey": key}
    r = await client.get(path, params=query, headers={"origin": SHOP, "authorization": basic(key)})
    assert r.status_code == 200
    source = r.json()["source"]
    assert source["id"].startswith("src-")
    assert {k: v for k, v in source.items() if k != "id"} == {
        "config": {},
        "enabled": True,
        "destinations": [],
    }
    assert r.headers["access-control-allow-origin"] == SHOP
    # The SDK's ad-block probe: HEAD, the key in Basic auth only.
    probe = await client.head(
        path, params={"view": "ad"}, headers={"origin": SHOP, "authorization": basic(key)}
    )
    assert probe.status_code == 200 and probe.content == b""


@pytest.mark.parametrize("kind", ["segment", "rudderstack"])
async def test_configuration_is_refused_to_unlisted_origins_and_unknown_keys(
    web: tuple, kind: str
) -> None:
    client, _, key = web

    async def get(write_key: str, origin: str) -> httpx.Response:
        headers = {"origin": origin}
        if kind == "segment":
            return await client.get(f"/v1/projects/{write_key}/settings", headers=headers)
        return await client.get("/sourceConfig/", params={"writeKey": write_key}, headers=headers)

    elsewhere = await get(key, OTHER)
    assert elsewhere.status_code == 403
    assert elsewhere.json()["error"] == f"origin {OTHER!r} may not load this source"
    assert "access-control-allow-origin" not in elsewhere.headers  # unreadable: no load
    unknown = await get(uid("wk"), SHOP)
    assert unknown.status_code == 401
    assert "access-control-allow-origin" not in unknown.headers


@pytest.mark.parametrize(
    "path", ["/v1/t", "/sourceConfig/", "/v1/projects/wk/settings", "/beacon/v1/batch"]
)
async def test_preflights_allow_get_and_name_every_header_the_libraries_send(
    web: tuple, path: str
) -> None:
    client, _, _ = web
    sent = "authorization, content-type, anonymousid, sentat, rsa-retry-attempt, x-retry-count"
    ok = await client.options(
        path,
        headers={
            "origin": SHOP,
            "access-control-request-method": "GET",
            "access-control-request-headers": sent,
        },
    )
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == SHOP
    assert "GET" in ok.headers["access-control-allow-methods"].split(", ")
    allowed = {h.lower() for h in ok.headers["access-control-allow-headers"].split(", ")}
    assert set(sent.split(", ")) <= allowed
    assert {h.lower() for h in ALLOWED_REQUEST_HEADERS} == allowed
    assert {
        "rsa-since-last-attempt",
        "rsa-since-first-attempt",
        "rsa-retry-reason",
        "rsa-recovered",
        "content-encoding",
    } <= allowed
    refused = await client.options(path, headers={"origin": OTHER})
    assert refused.status_code == 403


@pytest.mark.parametrize(
    ("path", "type_"),
    [
        ("/v1/t", "track"),
        ("/v1/p", "page"),
        ("/v1/i", "identify"),
        ("/v1/g", "group"),
        ("/v1/a", "alias"),
        ("/v1/s", "screen"),
    ],
)
async def test_analytics_js_posts_each_call_to_its_first_letter(
    web: tuple, path: str, type_: str
) -> None:
    client, bus, key = web
    event = {
        "userId": "u1",
        "anonymousId": uid("a"),
        "previousId": "a0",
        "groupId": "g1",
        "event": "Clicked",
        "writeKey": key,
        "sentAt": "2026-11-28T10:00:00.000Z",
        "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
    }
    r = await client.post(
        path,
        content=orjson.dumps(event),
        headers={"origin": SHOP, "content-type": "text/plain", "authorization": basic(key)},
    )
    assert r.status_code == 200, r.text
    [record] = bus.published
    stored = orjson.loads(record.value)
    assert stored["type"] == type_ and "writeKey" not in stored
    assert stored["_metadata"] == event["_metadata"]


async def test_analytics_js_batches_go_to_b(web: tuple) -> None:
    client, bus, key = web
    events = [{"type": "track", "event": "E", "anonymousId": uid("a")} for _ in range(3)]
    body = {"writeKey": key, "batch": events, "sentAt": "2026-11-28T10:00:00.000Z"}
    r = await client.post(
        "/v1/b",
        content=orjson.dumps(body),
        headers={"origin": SHOP, "content-type": "text/plain", "authorization": basic(key)},
    )
    assert r.status_code == 200 and len(bus.published) == 3


async def test_a_rudderstack_beacon_carries_its_key_in_the_query_string(web: tuple) -> None:
    client, bus, key = web
    body = orjson.dumps({"batch": [{"type": "page", "anonymousId": uid("a")}], "sentAt": None})
    beacon = {"origin": SHOP, "content-type": "text/plain;charset=UTF-8"}
    r = await client.post(
        "/beacon/v1/batch", params={"writeKey": key}, content=body, headers=beacon
    )
    assert r.status_code == 200 and len(bus.published) == 1
    # Only there: elsewhere a key in the query string is not a key.
    r = await client.post("/v1/batch", params={"writeKey": key}, content=body, headers=beacon)
    assert r.status_code == 401
    elsewhere = {**beacon, "origin": OTHER}
    r = await client.post(
        "/beacon/v1/batch", params={"writeKey": key}, content=body, headers=elsewhere
    )
    assert r.status_code == 403 and len(bus.published) == 1


@pytest.mark.parametrize("path", ["/v1/t", "/v1/b", "/v1/track"])
async def test_the_new_paths_judge_the_origin_by_the_events_source(web: tuple, path: str) -> None:
    client, bus, key = web
    event = {"type": "track", "event": "E", "anonymousId": uid("a")}
    body = {"batch": [event]} if path == "/v1/b" else event
    r = await client.post(
        path,
        content=orjson.dumps(body),
        headers={"origin": OTHER, "content-type": "text/plain", "authorization": basic(key)},
    )
    assert r.status_code == 403 and bus.published == []
    assert "access-control-allow-origin" not in r.headers
