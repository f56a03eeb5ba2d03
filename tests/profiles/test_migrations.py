"""The Alembic migrations build exactly the tables ``profiles/models.py`` describes, and
move the data they reshape."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.migrate import alembic_config, upgrade_to_head
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
    name = f"cdp_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(pg_url, "test-admin")
    async with admin.connect() as conn:
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
            text(f'CREATE DATABASE "{name}"')
        )
    engine = make_engine(pg_url.rsplit("/", 1)[0] + f"/{name}", "test-migrate")
    try:
        await _alembic(engine, command.upgrade, "0005")
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
        await _alembic(engine, command.downgrade, "0005")
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
                text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            )
        await admin.dispose()


async def _alembic(engine: AsyncEngine, step: Callable[[Config, str], None], to: str) -> None:
    def run(connection: Any) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        step(cfg, to)

    async with engine.begin() as conn:
        await conn.run_sync(run)
