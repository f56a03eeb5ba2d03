"""``among`` and ``unnested`` (:mod:`cdp_stream.profiles.sql`) on the real Postgres
server: the rows they select and insert, and one statement text whatever the number of
values or rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, Table, Text, insert, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.sql import among, unnested

ROWS = Table("among_rows", MetaData(), Column("id", UUID(as_uuid=True)), Column("name", Text))
WIDE = Table(
    "unnested_rows",
    MetaData(),
    Column("id", UUID(as_uuid=True)),
    Column("name", Text),
    Column("at", DateTime(timezone=True)),
    Column("details", JSONB),
)
NAMES = ("id", "name", "at", "details")


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


def _wide(n: int) -> list[dict[str, Any]]:
    at = datetime(2026, 11, 28, tzinfo=UTC)
    return [
        {
            "id": uuid.uuid4(),
            "name": None if k == 1 else f"n{k}",
            "at": at + timedelta(seconds=k),
            "details": {"k": k, "nested": [k, "é"]},
        }
        for k in range(n)
    ]


async def test_unnested_inserts_every_row_with_its_types(engine: AsyncEngine) -> None:
    """Each column's array is typed as the table's column: uuids, text with a NULL,
    timestamps and JSONB documents (serialized by the engine, as a plain insert does)."""
    rows = _wide(3)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TEMP TABLE unnested_rows (id uuid, name text, at timestamptz, "
                "details jsonb) ON COMMIT DROP"
            )
        )
        inserted = await conn.execute(
            insert(WIDE).from_select(NAMES, unnested(WIDE, NAMES, rows)).returning(*WIDE.c)
        )
        assert sorted(map(dict, inserted.mappings()), key=lambda r: r["at"]) == rows
        stored = await conn.execute(select(text("jsonb_typeof(details)")).select_from(WIDE))
        assert set(stored.scalars()) == {"object"}  # documents, not JSON strings


def test_unnested_is_one_statement_whatever_the_number_of_rows() -> None:
    """Multi-row VALUES would be a new text (prepared again) for every row count."""

    def sql(rows: list[dict[str, Any]]) -> str:
        query = insert(WIDE).from_select(NAMES, unnested(WIDE, NAMES, rows))
        return str(query.compile(dialect=postgresql.dialect()))

    assert sql(_wide(1)) == sql(_wide(40))
