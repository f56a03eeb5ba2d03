"""``among`` (:mod:`cdp_stream.profiles.sql`) on the real Postgres server: the rows it
selects, and one statement text whatever the number of values."""

from __future__ import annotations

import uuid

from sqlalchemy import Column, MetaData, Table, Text, insert, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.sql import among

ROWS = Table("among_rows", MetaData(), Column("id", UUID(as_uuid=True)), Column("name", Text))


async def test_among_selects_exactly_the_rows_listed(engine: AsyncEngine) -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TEMP TABLE among_rows (id uuid, name text) ON COMMIT DROP"))
        await conn.execute(insert(ROWS), [{"id": i, "name": f"n{k}"} for k, i in enumerate(ids)])
        for chosen in ([], ids[:1], ids[1:4], {*ids, uuid.uuid4()}):
            query = select(ROWS.c.id).where(among(ROWS.c.id, chosen))
            assert set((await conn.execute(query)).scalars()) == set(chosen) & set(ids)
        query = select(ROWS.c.name).where(among(ROWS.c.name, ["n0", "n3", "absent"]))
        assert sorted((await conn.execute(query)).scalars()) == ["n0", "n3"]


def test_among_is_one_statement_whatever_the_number_of_values() -> None:
    """The text asyncpg prepares (what ``IN`` would expand to one parameter per value)."""

    def sql(values: list[uuid.UUID]) -> str:
        query = select(ROWS.c.name).where(among(ROWS.c.id, values))
        options = {"render_postcompile": True}
        return str(query.compile(dialect=postgresql.dialect(), compile_kwargs=options))

    assert sql([uuid.uuid4()]) == sql([uuid.uuid4() for _ in range(300)]) == sql([])
