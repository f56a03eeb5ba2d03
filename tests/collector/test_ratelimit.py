"""Rate limits per write key: the token bucket (on a clock the test moves), and the
collector's 429 + Retry-After on the real Postgres (the sources) with a recording bus
(nothing of a refused request is published)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.app import Runtime, create_app
from cdp_stream.collector.ratelimit import RateLimits
from cdp_stream.profiles.credentials import Source, ensure_source, update_source
from cdp_stream.settings import Settings
from tests.collector.conftest import SHOP, RecordingBus
from tests.collector.test_cors import beacon
from tests.support import uid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_admits_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    limits = RateLimits(2.0, 4, clock)
    source = Source("src_a", ())
    assert [limits.take(source, 1) for _ in range(5)] == [0, 0, 0, 0, 1]
    clock.now += 0.5  # one token back
    assert limits.take(source, 1) == 0
    assert limits.take(source, 3) == 2  # 3 tokens at 2/s: 1.5 s, rounded up
    clock.now += 1.5
    assert limits.take(source, 3) == 0


def test_events_are_counted_and_a_batch_over_the_burst_goes_into_debt() -> None:
    clock = Clock()
    limits = RateLimits(10.0, 5, clock)
    source = Source("src_b", ())
    assert limits.take(source, 20) == 0  # admitted with a full bucket: never refused forever
    assert limits.take(source, 1) == 2  # -15 tokens: 1.6 s until one is there
    clock.now += 1.6
    assert limits.take(source, 1) == 0


def test_each_source_has_its_own_bucket_and_limits() -> None:
    limits = RateLimits(1.0, 1, Clock())
    own = Source("src_own", (), rate_limit_per_s=100.0, rate_limit_burst=3)
    assert [limits.take(own, 1) for _ in range(4)] == [0, 0, 0, 1]
    assert limits.take(Source("src_other", ()), 1) == 0  # not spent by the first
    assert limits.take(Source("src_free", (), rate_limit_per_s=0.0), 10**6) == 0


def test_a_rate_of_zero_in_the_settings_means_no_limit() -> None:
    limits = RateLimits.from_settings(Settings(rate_limit_per_s=0))
    assert all(limits.take(Source("src_c", ()), 10**6) == 0 for _ in range(3))


@pytest.fixture
async def limited(
    engine: AsyncEngine,
) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingBus, str]]:
    """A collector whose source may send 3 events at once, then 1 per second."""
    key, source_id = uid("wk"), uid("src")
    async with engine.begin() as conn:
        await ensure_source(conn, source_id, "limited", key, [SHOP])
        await update_source(conn, source_id, {"rate_limit_per_s": 1.0, "rate_limit_burst": 3})
    bus = RecordingBus()
    app = create_app(Runtime(Settings(), "test", engine, bus))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client, bus, key


async def test_over_the_limit_is_429_with_retry_after_and_nothing_published(
    limited: tuple[httpx.AsyncClient, RecordingBus, str],
) -> None:
    client, bus, key = limited
    track = {"userId": "u1", "event": "E"}
    for _ in range(3):
        assert (await client.post("/v1/track", json=track, auth=(key, ""))).status_code == 200
    refused = await client.post("/v1/track", json=track, auth=(key, ""))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "success": False,
        "error": "rate limit of this write key exceeded, retry later",
    }
    assert len(bus.published) == 3


async def test_a_batch_costs_its_events_and_a_page_can_read_the_429(
    limited: tuple[httpx.AsyncClient, RecordingBus, str],
) -> None:
    client, bus, key = limited
    headers = {"origin": SHOP, "content-type": "text/plain"}
    assert (await client.post("/v1/batch", content=beacon(key, 2), headers=headers)).is_success
    refused = await client.post("/v1/batch", content=beacon(key, 2), headers=headers)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.headers["access-control-allow-origin"] == SHOP
    assert refused.headers["access-control-expose-headers"] == "Retry-After"
    assert [orjson.loads(r.value)["type"] for r in bus.published] == ["track", "track"]
