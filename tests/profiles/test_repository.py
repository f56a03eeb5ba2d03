"""What several domains share in ``profiles.repository``: which canonical profile holds an
id (merges point straight at it, or through a chain while a batch rewrites them)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import profiles


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


async def test_lock_keys_begins_the_transaction_with_the_locks_alone(engine: AsyncEngine) -> None:
    """As a transaction's first statement the locks are its only one (no statement spent
    on beginning it), and they are held, in this transaction, until it ends."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    keys = [repo.lock_key("test", uuid.uuid4().hex) for _ in range(3)]
    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with engine.begin() as conn:
            await repo.lock_keys(conn, keys)
            assert len(statements) == 1 and "pg_advisory_xact_lock" in statements[0]
            held = await conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND granted"
                )
            )
            assert held.scalar_one() == len(keys)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
    async with engine.begin() as conn:  # released at commit: free for another transaction
        free = text(
            "SELECT bool_and(pg_try_advisory_xact_lock(k)) FROM unnest(CAST(:k AS bigint[])) k"
        )
        assert (await conn.execute(free, {"k": keys})).scalar_one()
