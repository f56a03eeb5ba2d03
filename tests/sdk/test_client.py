"""The SDK against the real collector, served by uvicorn on a real socket, on the real
broker and database (a resolver task too, for the profile check).

The collector sits behind ``tests.support.Gate``, which records every tracking
request it sees (the answer's status and the messageIds in the body) and can answer the
next requests itself (a 429 or 503 with Retry-After) to drive the retry paths.

The thread-backed client blocks: the tests call its blocking methods (flush, shutdown)
through ``asyncio.to_thread`` so the server, on this event loop, keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.credentials import ensure_source, update_source
from cdp_stream_sdk import AsyncClient, Client
from tests.sdk.conftest import API_TOKEN, WRITE_KEY
from tests.support import Gate, Server, eventually, uid


@contextlib.asynccontextmanager
async def sdk(server: Server, **options: Any) -> AsyncIterator[Client]:
    options = {"flush_interval": 0.2, "backoff_base": 0.05, "backoff_max": 0.5, **options}
    write_key = options.pop("write_key", WRITE_KEY)
    client = Client(write_key, server.url, **options)
    try:
        yield client
    finally:
        await asyncio.to_thread(client.shutdown, 5.0)


async def test_every_call_arrives_and_builds_a_profile(server: Server, gate: Gate) -> None:
    user, anon = uid("sdk-u"), uid("sdk-a")
    async with sdk(server) as client:
        ids = [
            client.identify(user, {"plan": "pro", "name": "Ada"}, anonymous_id=anon),
            client.track(user, "Signed Up", {"source": "sdk"}, context={"ip": "203.0.113.9"}),
            client.page(user, "Docs", "Intro", {"path": "/docs"}),
            client.screen(user, "App", "Home"),
            client.group(user, "acme", {"name": "Acme"}),
            client.alias(anon, user),
        ]
        assert all(ids) and len(set(ids)) == 6
        assert await asyncio.to_thread(client.flush, 10.0)
        assert client.stats.sent == 6
        assert client.dropped == 0 and client.stats.rejected_by_collector == 0
    assert gate.delivered() == Counter(ids)

    async with httpx.AsyncClient(base_url=server.url) as http:

        async def probe() -> dict[str, Any] | None:
            r = await http.get(
                f"/v1/profiles/user_id:{user}", headers={"authorization": f"Bearer {API_TOKEN}"}
            )
            return dict(r.json()) if r.status_code == 200 else None

        profile = await eventually(probe)
    assert profile is not None, "no profile for the SDK's events"
    assert profile["traits"] == {"plan": "pro", "name": "Ada"}


async def test_batches_by_count_and_flush_sends_the_rest(server: Server, gate: Gate) -> None:
    async with sdk(server, flush_at=5, flush_interval=60) as client:
        ids = [client.track(uid("u"), "Clicked", {"n": i}) for i in range(12)]

        async def two_batches() -> bool:
            return len(gate.sizes()) >= 2

        assert await eventually(two_batches, within_s=10)
        await asyncio.sleep(0.3)
        assert gate.sizes() == [5, 5]  # the last 2 wait for flush_interval (60 s)
        assert client.pending == 2
        assert await asyncio.to_thread(client.flush, 10.0)
        assert gate.sizes() == [5, 5, 2]
    assert gate.delivered() == Counter(ids)


async def test_byte_budget_splits_batches_and_oversize_events_are_dropped(
    server: Server, gate: Gate
) -> None:
    async with sdk(server, max_batch_bytes=20_000, flush_interval=60) as client:
        ids = [client.track(uid("u"), "Big", {"blob": "x" * 5000}) for _ in range(10)]
        assert client.track(uid("u"), "Huge", {"blob": "x" * 40_000}) is None
        assert client.stats.dropped_invalid == 1
        assert await asyncio.to_thread(client.flush, 10.0)
    assert gate.delivered() == Counter(ids)
    assert len(gate.sizes()) >= 3 and max(gate.sizes()) <= 3  # 3 x ~5.3 KB per 20 KB


async def test_shutdown_delivers_everything_queued(server: Server, gate: Gate) -> None:
    client = Client(WRITE_KEY, server.url, flush_interval=60)
    ids = [client.track(uid("u"), "Left", {"i": i}) for i in range(7)]
    assert not gate.requests
    assert await asyncio.to_thread(client.shutdown, 10.0)
    assert gate.delivered() == Counter(ids)
    assert client.track("u", "After") is None  # after shutdown: dropped, not raised
    assert client.dropped == 1


async def test_collector_down_queues_retries_and_delivers_once(server: Server, gate: Gate) -> None:
    async with sdk(server, max_retries=1000, flush_interval=0.05) as client:
        await server.stop()
        try:
            ids = [client.track(uid("u"), "Offline", {"i": i}) for i in range(5)]
            await asyncio.sleep(1.0)
            assert client.pending == 5
            assert client.stats.retries >= 2
            assert not gate.requests
        finally:
            await server.start()
        assert await asyncio.to_thread(client.flush, 15.0)
        assert client.stats.sent == 5 and client.dropped == 0
    assert gate.delivered() == Counter(ids)  # each messageId exactly once


async def test_429_and_503_are_retried_honouring_retry_after(server: Server, gate: Gate) -> None:
    gate.answers = [429, 503]
    async with sdk(server, backoff_base=0.01) as client:
        ids = [client.track(uid("u"), "Throttled")]
        started = time.monotonic()
        assert await asyncio.to_thread(client.flush, 15.0)
        assert time.monotonic() - started >= 1.0  # Retry-After: 1, backoff_max 0.5
        assert client.stats.retries == 2 and client.stats.sent == 1
    assert [status for status, _ in gate.requests] == [429, 503, 200]
    assert gate.delivered() == Counter(ids)


async def test_the_collectors_rate_limit_is_honoured_and_nothing_is_lost(
    server: Server, gate: Gate, engine: AsyncEngine
) -> None:
    """A source limited to 20 events/s with a burst of 10 (the real token bucket, not the
    gate): the SDK's batches of 5 meet 429s, wait their Retry-After, and every event
    arrives once."""
    key, source_id = uid("wk"), uid("src")
    async with engine.begin() as conn:
        await ensure_source(conn, source_id, "sdk-limited", key, [])
        await update_source(conn, source_id, {"rate_limit_per_s": 20.0, "rate_limit_burst": 10})
    async with sdk(server, write_key=key, flush_at=5, max_retries=1000) as client:
        ids = [client.track(uid("u"), "Burst", {"i": i}) for i in range(40)]
        assert await asyncio.to_thread(client.flush, 30.0)
        assert client.stats.sent == 40 and client.dropped == 0
        assert client.stats.retries >= 1
    statuses = Counter(status for status, _ in gate.requests)
    assert statuses[429] >= 1 and set(statuses) == {200, 429}, statuses
    assert gate.delivered() == Counter(ids)  # each messageId exactly once


async def test_4xx_is_dropped_and_counted_never_retried(server: Server, gate: Gate) -> None:
    async with sdk(server, write_key="wk_wrong") as client:
        for i in range(3):
            assert client.track(uid("u"), "Denied", {"i": i})
        assert await asyncio.to_thread(client.flush, 10.0)
        assert client.stats.dropped_rejected == 3 and client.dropped == 3
        assert client.stats.retries == 0 and client.stats.sent == 0
    assert [status for status, _ in gate.requests] == [401]


async def test_queue_full_drops_and_counts(server: Server, gate: Gate) -> None:
    async with sdk(server, max_queue_size=3, flush_interval=60) as client:
        ids = [client.track(uid("u"), "Queued", {"i": i}) for i in range(5)]
        assert ids[3] is None and ids[4] is None
        assert client.stats.dropped_queue_full == 2 and client.dropped == 2
        assert await asyncio.to_thread(client.flush, 10.0)
    assert gate.delivered() == Counter(i for i in ids if i)


async def test_never_raises(server: Server, gate: Gate) -> None:
    class Weird:
        def __str__(self) -> str:
            return "weird"

    circular: dict[str, Any] = {}
    circular["self"] = circular
    async with sdk(server) as client:
        assert client.track(None, "No one") is None  # no userId nor anonymousId
        assert client.track("u") is None  # no event name
        assert client.group("u") is None  # no groupId
        assert client.alias(None, "u") is None  # no previousId
        assert client.track("u", "NaN", {"x": math.nan}) is None
        assert client.track("u", "Loop", circular) is None
        assert client.stats.dropped_invalid == 6
        ok = client.track("u-" + uid(), "Odd", {"w": Weird(), "s": {1}})  # made strings/lists
        assert ok
        assert await asyncio.to_thread(client.flush, 10.0)
        assert client.stats.sent == 1
    # Nobody listening, one retry: the batch is dropped and counted, nothing raised.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = Client(WRITE_KEY, dead, max_retries=1, backoff_base=0.01, flush_interval=0.01)
    assert client.identify("u", {"a": 1})
    assert await asyncio.to_thread(client.flush, 10.0)
    assert client.stats.dropped_retries_exhausted == 1
    assert await asyncio.to_thread(client.shutdown, 5.0)


async def test_async_client(server: Server, gate: Gate) -> None:
    user = uid("sdk-async")
    async with AsyncClient(
        WRITE_KEY, server.url, flush_at=2, flush_interval=60, backoff_base=0.05
    ) as client:
        ids = [
            await client.identify(user, {"plan": "free"}),
            await client.track(user, "Async", {"ok": True}),
            await client.page(user, name="Home"),
            await client.screen(user, name="Main"),
            await client.group(user, "g1"),
            await client.alias("old-" + user, user),
            await client.track(None, "Nobody"),
        ]
        assert ids[-1] is None and client.stats.dropped_invalid == 1
        assert await client.flush(10.0)
        assert client.stats.sent == 6
        assert gate.sizes() == [2, 2, 2]
        gate.answers = [503]
        retried = await client.track(user, "Retried")
        assert await client.flush(10.0)
        assert client.stats.retries == 1
    assert gate.delivered() == Counter([i for i in ids if i] + [retried])


async def test_flush_interval_sends_without_flush(server: Server, gate: Gate) -> None:
    async with sdk(server, flush_interval=0.2) as client:
        ids = [client.track(uid("u"), "Timed")]

        async def arrived() -> bool:
            return bool(gate.delivered())

        assert await eventually(arrived, within_s=5)
        assert gate.delivered() == Counter(ids)
    async with AsyncClient(WRITE_KEY, server.url, flush_interval=0.2) as aclient:
        aid = await aclient.track(uid("u"), "Timed async")

        async def arrived_async() -> bool:
            return aid in gate.delivered()

        assert await eventually(arrived_async, within_s=5)


def test_retry_after_parsing() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from cdp_stream_sdk.client import backoff, is_retryable, retry_after

    assert retry_after(httpx.Headers({"retry-after": "3"})) == 3.0
    assert retry_after(httpx.Headers({})) is None
    assert retry_after(httpx.Headers({"retry-after": "soon"})) is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < (retry_after(httpx.Headers({"retry-after": later})) or 0) <= 30
    assert all(0 <= backoff(n, 0.25, 2.0) <= 2.0 for n in range(20))
    assert is_retryable(429) and is_retryable(503) and not is_retryable(401)
    assert not is_retryable(400) and not is_retryable(413)
