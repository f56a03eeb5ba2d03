"""The profile-update outbox on the real server: a request takes back only the rows it
queued (by id), leaving every other row to the resolvers' relay; a rolled-back take
leaves them all where they were."""

from __future__ import annotations

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles import outbox
from cdp_stream.profiles.models import profile_update_outbox
from tests.support import uid


def update(key: str, **fields: object) -> outbox.Update:
    return outbox.Update(key, orjson.dumps({"profile_id": key, **fields}))


async def pending(engine: AsyncEngine, keys: list[str]) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(profile_update_outbox.c.key).where(profile_update_outbox.c.key.in_(keys))
        )
        return sorted(rows.scalars())


async def test_taking_by_id_leaves_the_other_rows(engine: AsyncEngine) -> None:
    mine, theirs = uid("mine"), uid("theirs")
    async with engine.begin() as conn:
        await outbox.insert_outbox(conn, [update(theirs)])  # another writer's row
        ids = await outbox.insert_outbox(conn, [update(mine, type="deleted"), update(mine, n=2)])
    assert len(set(ids)) == 2
    async with engine.begin() as conn:
        taken = await outbox.take_outbox(conn, 100, ids)
    assert [(k, orjson.loads(v)) for k, v in taken] == [
        (mine, {"profile_id": mine, "type": "deleted"}),
        (mine, {"profile_id": mine, "n": 2}),
    ]
    assert await pending(engine, [mine, theirs]) == [theirs]
    async with engine.begin() as conn:
        assert await outbox.take_outbox(conn, 100, ids) == []  # taken once


async def test_a_rolled_back_take_leaves_the_rows(engine: AsyncEngine) -> None:
    """What the API relies on when the bus is down: the publish fails, the transaction
    rolls back, and the rows wait for the resolvers."""
    mine = uid("mine")
    async with engine.begin() as conn:
        ids = await outbox.insert_outbox(conn, [update(mine, events=[])])
    async with engine.connect() as conn, conn.begin() as tx:
        assert len(await outbox.take_outbox(conn, 100, ids)) == 1
        await tx.rollback()
    assert await pending(engine, [mine]) == [mine]
    async with engine.begin() as conn:
        assert [k for k, _ in await outbox.take_outbox(conn, 100, ids)] == [mine]
