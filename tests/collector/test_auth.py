"""Write keys from memory (real Postgres): one lookup however many requests ask, the stale
source served while its refresh is slow or failing, and a failure only where nothing is
known."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import event, text, update
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cdp_stream.collector.auth import Sources, basic_username
from cdp_stream.profiles.credentials import Source, ensure_source
from cdp_stream.profiles.models import sources
from tests.support import uid

MANY = 200


@pytest.fixture
async def tiny_engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """One connection, and a short wait for it: easy to hold busy (a pool timeout)."""
    engine = create_async_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    yield engine
    await engine.dispose()


@pytest.fixture
def lookups(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every statement that reads the sources table, as Postgres receives it."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM sources" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine.sync_engine, "before_cursor_execute", record)


async def new_source(engine: AsyncEngine, origins: list[str] | None = None) -> tuple[str, str]:
    source_id, key = uid("src"), uid("wk")
    async with engine.begin() as conn:
        await ensure_source(conn, source_id, "test", key, origins or [])
    return source_id, key


async def test_many_requests_for_a_key_not_in_memory_make_one_lookup(
    engine: AsyncEngine, lookups: list[str]
) -> None:
    source_id, key = await new_source(engine)
    cache = Sources(engine)
    found = await asyncio.gather(*(cache.by_write_key(key) for _ in range(MANY)))
    assert found == [Source(source_id, ())] * MANY
    unknown = await asyncio.gather(*(cache.by_write_key(uid("nope")) for _ in range(3)))
    same_unknown = await asyncio.gather(*(cache.by_write_key("wk_unknown") for _ in range(MANY)))
    assert unknown == [None] * 3 and same_unknown == [None] * MANY
    assert len(lookups) == 1 + 3 + 1
    await cache.by_write_key(key)  # from memory now
    assert len(lookups) == 5


async def test_an_expired_source_is_served_while_one_slow_refresh_runs(
    engine: AsyncEngine, lookups: list[str]
) -> None:
    source_id, key = await new_source(engine, ["https://old.example"])
    cache = Sources(engine, known_ttl_s=0.05)
    await cache.by_write_key(key)
    async with engine.begin() as conn:
        await conn.execute(
            update(sources)
            .where(sources.c.id == source_id)
            .values(allowed_origins=["https://new.example"])
        )
    await asyncio.sleep(0.1)  # expired
    async with engine.connect() as blocker:  # the refresh waits behind this lock
        await blocker.execute(text("LOCK TABLE sources IN ACCESS EXCLUSIVE MODE"))
        for _ in range(3):
            served = await asyncio.gather(*(cache.by_write_key(key) for _ in range(MANY)))
            assert served == [Source(source_id, ("https://old.example",))] * MANY
            await asyncio.sleep(0.05)
        assert len(lookups) == 2  # the first one, and one refresh however many asked
        await blocker.rollback()
    for _ in range(100):  # the refresh completes once the lock is gone
        if await cache.by_write_key(key) == Source(source_id, ("https://new.example",)):
            break
        await asyncio.sleep(0.02)
    assert await cache.by_write_key(key) == Source(source_id, ("https://new.example",))
    assert len(lookups) == 2


async def test_a_failing_refresh_keeps_the_stale_source_and_an_unknown_key_fails(
    engine: AsyncEngine, tiny_engine: AsyncEngine
) -> None:
    source_id, key = await new_source(engine)
    cache = Sources(tiny_engine, known_ttl_s=0.05, unknown_ttl_s=0.05)
    assert await cache.by_write_key(key) == Source(source_id, ())
    await asyncio.sleep(0.1)
    async with tiny_engine.connect():  # the only connection is busy: every lookup times out
        for _ in range(5):  # several failed refreshes, each retried after unknown_ttl_s
            assert await cache.by_write_key(key) == Source(source_id, ())
            await asyncio.sleep(0.4)
        with pytest.raises(PoolTimeout):
            await cache.by_write_key(uid("wk"))
    assert await cache.by_write_key(key) == Source(source_id, ())


async def test_preflight_origins_come_from_memory_too(
    engine: AsyncEngine, lookups: list[str]
) -> None:
    await new_source(engine, ["https://pre.example"])
    cache = Sources(engine)
    allowed = await asyncio.gather(*(cache.any_allows("https://pre.example") for _ in range(MANY)))
    assert all(allowed)
    assert not await cache.any_allows("https://other.example")
    assert len(lookups) == 1


def test_basic_username_is_the_write_key() -> None:
    assert basic_username("Basic " + base64.b64encode(b"wk_1:").decode()) == "wk_1"
    assert basic_username("Bearer x") is None
    assert basic_username("Basic !!!") is None


async def test_a_flood_of_keys_evicts_the_least_recently_used_not_the_key_in_use(
    engine: AsyncEngine, lookups: list[str]
) -> None:
    source_id, busy = await new_source(engine)
    _, idle = await new_source(engine)
    cache = Sources(engine, max_keys=4)
    await cache.by_write_key(idle)
    for _ in range(10):
        assert await cache.by_write_key(busy) == Source(source_id, ())
        assert await cache.by_write_key(uid("flood")) is None
    assert len(lookups) == 1 + 1 + 10  # the busy key was never looked up again
    await cache.by_write_key(idle)
    assert len(lookups) == 13  # the idle one was evicted: looked up again
