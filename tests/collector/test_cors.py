"""Origins per source: the patterns, and the collector's answers to browsers (real
Postgres for the sources; a recording memory bus shows what was published)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from cdp_stream.bus.base import BusUnavailable, Record
from cdp_stream.collector.cors import origin_allowed
from cdp_stream.origins import origin_pattern
from tests.collector.conftest import SHOP
from tests.support import uid


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("https://Shop.Example.com/", "https://shop.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://*.example.com", "https://*.example.com"),
        (" * ", "*"),
    ],
)
def test_origin_patterns_are_normalized(value: str, normalized: str) -> None:
    assert origin_pattern(value) == normalized


@pytest.mark.parametrize(
    "value",
    ["example.com", "https://shop.example.com/path", "ftp://x.com", "https://*", "https://a b", ""],
)
def test_what_is_not_an_origin_is_refused_with_the_reason(value: str) -> None:
    with pytest.raises(ValueError, match="is not an origin pattern"):
        origin_pattern(value)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://shop.example.com", True),
        ("https://SHOP.example.com", True),
        ("http://shop.example.com", False),  # another scheme is another origin
        ("http://eu.example.com", False),
        ("https://eu.example.com:8443", False),  # ...and so is another port
        ("https://eu.blog.example.com", True),  # the wildcard covers any depth
        ("https://example.com", False),  # ...but not the domain itself
        ("https://evilexample.com", False),
        ("https://example.com.evil.net", False),
        ("null", False),  # sandboxed frames and file:// pages
        ("https://x.example.com:bad", False),
    ],
)
def test_origin_matching(origin: str, allowed: bool) -> None:
    assert origin_allowed(origin, [SHOP, "https://*.example.com"]) is allowed


def test_star_allows_any_page() -> None:
    assert origin_allowed("null", ["*"]) and origin_allowed("http://a.test:1", ["*"])
    assert not origin_allowed("https://a.test", [])


def beacon(write_key: str, n: int = 1) -> bytes:
    """What the browser library sends: text/plain, the write key in the body."""
    events = [{"type": "track", "event": "Clicked", "anonymousId": uid("a")} for _ in range(n)]
    return orjson.dumps({"batch": events, "writeKey": write_key})


async def test_a_listed_origin_may_send_text_plain_and_read_the_answer(web: tuple) -> None:
    client, bus, key = web
    r = await client.post(
        "/v1/batch",
        content=beacon(key, 2),
        headers={"origin": SHOP, "content-type": "text/plain;charset=UTF-8"},
    )
    assert r.status_code == 200 and r.json() == {"success": True}
    assert r.headers["access-control-allow-origin"] == SHOP
    assert r.headers["access-control-expose-headers"] == "Retry-After"
    assert r.headers["vary"] == "Origin"
    assert len(bus.published) == 2


async def test_an_unlisted_origin_is_refused_and_nothing_is_published(web: tuple) -> None:
    client, bus, key = web
    r = await client.post(
        "/v1/batch",
        content=beacon(key),
        headers={"origin": "https://evil.example.net", "content-type": "text/plain"},
    )
    assert r.status_code == 403
    assert r.json()["error"] == "origin 'https://evil.example.net' may not send to this source"
    assert "access-control-allow-origin" not in r.headers
    assert bus.published == []


async def test_servers_send_no_origin_and_are_not_judged(web: tuple) -> None:
    client, bus, key = web
    r = await client.post("/v1/track", json={"userId": "u1", "event": "E"}, auth=(key, ""))
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    assert len(bus.published) == 1


async def test_preflight_passes_for_an_origin_some_source_lists(web: tuple) -> None:
    client, _, _ = web
    ok = await client.options(
        "/v1/track",
        headers={
            "origin": SHOP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        },
    )
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == SHOP
    assert ok.headers["access-control-allow-methods"] == "GET, HEAD, POST"
    allowed = ok.headers["access-control-allow-headers"].split(", ")
    assert "*" not in allowed  # a wildcard would not cover Authorization
    assert {"Authorization", "Content-Type", "Content-Encoding"} <= set(allowed)
    refused = await client.options("/v1/track", headers={"origin": "https://other.test"})
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers


async def test_a_listed_origin_reads_a_503_and_its_retry_after(
    web: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, bus, key = web

    async def down(records: Sequence[Record]) -> None:
        raise BusUnavailable("broker down")

    monkeypatch.setattr(bus, "publish_many", down)
    r = await client.post(
        "/v1/batch", content=beacon(key), headers={"origin": SHOP, "content-type": "text/plain"}
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.headers["access-control-allow-origin"] == SHOP


async def test_malformed_text_plain_is_a_400(web: tuple) -> None:
    client, bus, _ = web
    r = await client.post(
        "/v1/batch", content=b"{not json", headers={"origin": SHOP, "content-type": "text/plain"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert bus.published == []
