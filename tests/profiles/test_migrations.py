"""The Alembic migrations build exactly the tables ``profiles/models.py`` describes, and
move the data they reshape."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.migrate import alembic_config, migrate, upgrade_to_head
from cdp_stream.profiles.models import metadata


async def test_migrated_schema_matches_the_models(engine: AsyncEngine) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        context = MigrationContext.configure(sync_conn, opts={"compare_server_default": False})
        return list(compare_metadata(context, metadata))

    async with engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_0006_moves_the_ledgers_orders_into_their_table(pg_url: str) -> None:
    """A database at 0005 with a profile whose ledger holds its orders: at 0006 each
    stored purchase event is a row of ``orders``, the profile keeps the same money fields
    summed from them and no ledger; down and up again works."""
    async with _scratch_database(pg_url) as engine:
        await migrate(engine, "0005")
        pid = uuid.uuid4()
        ledger = {
            "orders": {"o1": ["EUR", 30_000_000]},
            "refunds": {"o1": 5_000_000},
            "unkeyed_orders": {"EUR": [1, 10_000_000]},
        }
        money = {"orders": {"EUR": {"count": 2, "micros": 35_000_000}}, "order_count": 2}
        computed = {"event_count": 5, "ledger": ledger, **money}
        sale = {"order_id": "o1", "revenue": 30, "currency": "EUR"}
        order = {"event": "Order Completed", "properties": sale}
        calls = [
            order,
            {**order, "properties": {**sale, "order_id": " o1 "}},  # reported again
            {"event": "Order Refunded", "properties": {"order_id": "o1", "total": 5}},
            {"event": "Order Completed", "properties": {"revenue": 10, "currency": "eur"}},
            {"event": "Signed Up"},
        ]
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO profiles (id, computed) VALUES (:id, CAST(:c AS jsonb))"),
                {"id": pid, "c": orjson.dumps(computed).decode()},
            )
            for i, call in enumerate(calls):
                payload = {"type": "track", "messageId": f"m{i}", "sourceId": "s", **call}
                await conn.execute(
                    text(
                        "INSERT INTO events (source_id, message_id, profile_id, type, event,"
                        " channel, timestamp, received_at, payload, origin_profile_id) VALUES"
                        " ('s', :m, :p, 'track', :e, 'purchase', now(), now(),"
                        " CAST(:payload AS jsonb), :p)"
                    ),
                    {
                        "m": f"m{i}",
                        "p": pid,
                        "e": call["event"],
                        "payload": orjson.dumps(payload).decode(),
                    },
                )
        await upgrade_to_head(engine)
        async with engine.connect() as conn:
            kinds = (await conn.execute(text("SELECT kind FROM orders ORDER BY message_id"))).all()
            after = await conn.scalar(
                text("SELECT computed FROM profiles WHERE id = :id"), {"id": pid}
            )
        assert [k for (k,) in kinds] == ["order", "order", "refund", "order"]
        assert after == {
            "event_count": 5,
            **money,
            "currency": "EUR",
            "total_revenue": 35.0,
            "average_order_value": 17.5,
        }
        await migrate(engine, "0005", command.downgrade)
        await upgrade_to_head(engine)


async def test_an_index_revision_lets_writes_through_while_it_builds(pg_url: str) -> None:
    """The README's upgrade migrates while the old stages write. At 0012, with a
    transaction open that claimed an identity (a resolver's batch), the upgrade to 0013
    (a new index on ``identities``) waits for that transaction, and meanwhile another
    claim is written at once: a plain ``CREATE INDEX`` would have queued it behind the
    build. Once the open transaction ends the upgrade finishes: the new index valid, the
    one it replaces gone."""
    async with _scratch_database(pg_url) as engine:
        await migrate(engine, "0012")
        a, b = uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO profiles (id) VALUES (:a), (:b)"), {"a": a, "b": b}
            )
        claim = text(
            "INSERT INTO identities (type, value, profile_id, claimed_by)"
            " VALUES ('email', :v, :p, :p)"
        )
        async with engine.connect() as batch:
            await batch.execute(claim, {"v": "a@example.com", "p": a})  # left open
            upgrade = asyncio.create_task(migrate(engine, "0013"))
            async with engine.connect() as conn:
                building = text(
                    "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX%'"
                    " AND wait_event_type = 'Lock'"
                )
                for _ in range(200):
                    if await conn.scalar(building):
                        break
                    await conn.rollback()  # pg_stat_activity is read once per transaction
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the upgrade never waited for the open transaction")
            async with engine.begin() as other:
                await other.execute(text("SET LOCAL lock_timeout = '2s'"))
                await other.execute(claim, {"v": "b@example.com", "p": b})
            assert not upgrade.done()
            await batch.commit()
        await asyncio.wait_for(upgrade, 30)
        async with engine.connect() as conn:
            indexes = await conn.execute(
                text(
                    "SELECT c.relname, i.indisvalid FROM pg_index i"
                    " JOIN pg_class c ON c.oid = i.indexrelid"
                    " WHERE i.indrelid = 'identities'::regclass"
                )
            )
            claimed = await conn.scalar(text("SELECT count(*) FROM identities"))
        assert dict(indexes.all()) == {"identities_pkey": True, "identities_profile_type_idx": True}
        assert claimed == 2


async def test_processes_starting_together_migrate_one_at_a_time(pg_url: str) -> None:
    """Every stage migrates at start: three at once on an empty database all end at the
    newest revision (without the migrator lock two would create the same tables). One
    that fails (here: a revision that does not exist) lets the lock go."""
    async with _scratch_database(pg_url) as engine:
        with pytest.raises(CommandError):
            await migrate(engine, "9999")
        await asyncio.wait_for(asyncio.gather(*(upgrade_to_head(engine) for _ in range(3))), 60)
        async with engine.connect() as conn:
            version = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()


@contextlib.asynccontextmanager
async def _scratch_database(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a new empty database beside the test one, dropped after."""
    name = f"cdp_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(pg_url, "test-admin")
    async with admin.connect() as conn:
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
            text(f'CREATE DATABASE "{name}"')
        )
    engine = make_engine(pg_url.rsplit("/", 1)[0] + f"/{name}", "test-migrate")
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
                text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            )
        await admin.dispose()
