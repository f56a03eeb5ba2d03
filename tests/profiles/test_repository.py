"""What several domains share in ``profiles.repository``: which canonical profile holds an
id (merges point straight at it, or through a chain while a batch rewrites them)."""

from __future__ import annotations

import uuid

from sqlalchemy import insert
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
