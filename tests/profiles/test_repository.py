"""The resolver's queries on the driver's (asyncpg) connection: in the caller's
transaction, and failing the way ``retrying`` understands."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import retrying
from cdp_stream.profiles.models import profiles
from cdp_stream.sealing import SuppressionKeys

NOWAIT = "SELECT id FROM profiles WHERE id = :id FOR UPDATE NOWAIT"


async def test_rows_locked_as_the_first_statement_stay_locked_until_the_commit(
    engine: AsyncEngine,
) -> None:
    pid = uuid.uuid4()
    async with engine.begin() as conn:
        await repo.insert_profiles(conn, [(pid, datetime.now(UTC))])
    async with engine.begin() as holder:
        assert list(await repo.lock_profiles(holder, [pid])) == [pid]  # the first statement
        async with engine.connect() as other:
            with pytest.raises(DBAPIError, match="could not obtain lock"):
                await other.execute(text(NOWAIT), {"id": pid})
    async with engine.begin() as other:
        assert (await other.execute(text(NOWAIT), {"id": pid})).scalar() == pid


async def test_a_unique_violation_on_the_drivers_copy_is_retried(engine: AsyncEngine) -> None:
    """Two resolvers storing one message: the later COPY fails, and ``retrying`` runs the
    work again (where it finds the event stored) instead of raising the driver's error."""
    pid, now = uuid.uuid4(), datetime.now(UTC)
    key = ("src_test", f"m-{uuid.uuid4().hex}")
    row = repo.EventRow(*key, pid, pid, "track", "x", "server", now, now, b'{"type":"track"}')
    async with engine.begin() as conn:
        await repo.insert_profiles(conn, [(pid, now)])
        await repo.insert_events(conn, [row])
    attempts: list[set[tuple[str, str]]] = []

    async def store(conn: AsyncConnection) -> None:
        attempts.append((await repo.batch_reads(conn, [key], [], SuppressionKeys())).stored)
        if len(attempts) == 1:  # as if it had read before the other one committed
            await repo.insert_events(conn, [row])

    await retrying(engine, store)
    assert attempts == [{key}, {key}]


async def test_canonical_ids_follow_merges_for_many_at_once(engine: AsyncEngine) -> None:
    """Each id to its canonical profile, a chain of merges too; an unknown id is absent."""
    head, merged, older, unknown = (uuid.uuid4() for _ in range(4))
    async with engine.connect() as conn:  # never committed: rolled back on close
        await conn.execute(insert(profiles), [{"id": head}])
        await conn.execute(insert(profiles), [{"id": merged, "merged_into": head}])
        await conn.execute(insert(profiles), [{"id": older, "merged_into": merged}])
        found = await repo.canonical_ids(conn, [head, merged, older, unknown])
        assert found == {head: head, merged: head, older: head}
        assert await repo.canonical_id(conn, older) == head
        assert await repo.canonical_id(conn, unknown) is None
        assert await repo.canonical_ids(conn, []) == {}
