"""Bring the schema to the newest Alembic revision (``cdp-stream migrate``; ``up`` runs it).

Alembic runs on a connection we hand it, so migrating works inside a running event loop
and on the same engine the stages use. Each revision is its own transaction, so an
index can be built ``CONCURRENTLY`` (:func:`create_index_online`): the upgrade procedure
in the README migrates while the old stages still run, and a plain ``CREATE INDEX``
would stop every write to the table (the resolvers' claims, the events' ``COPY``) for as
long as the build takes on a big table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command, op
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).with_name("migrations")

# A session-level advisory lock: one migrator at a time when several processes start
# together. Session-level because each revision commits on its own.
_MIGRATOR_LOCK = 727001
_MIGRATOR_POLL_S = 0.2


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


async def migrate(
    engine: AsyncEngine,
    to: str = "head",
    step: Callable[[Config, str], None] = command.upgrade,
) -> None:
    """Run an Alembic command (``upgrade`` by default) to revision ``to``, holding the
    migrator lock. A revision that fails is rolled back; the ones before it stay."""

    def run(connection: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        step(cfg, to)

    async with engine.connect() as conn:
        # Tried, not waited for in one statement: a waiting statement is a transaction,
        # and a CREATE INDEX CONCURRENTLY of the migrator holding the lock waits for every
        # transaction older than its snapshot: it and this one would wait for each other.
        while not await conn.scalar(text(f"SELECT pg_try_advisory_lock({_MIGRATOR_LOCK})")):
            await conn.commit()
            await asyncio.sleep(_MIGRATOR_POLL_S)
        await conn.commit()  # Alembic begins each revision's transaction itself
        try:
            await conn.run_sync(run)
        except BaseException:
            # The pool keeps this session: the lock must not stay with it.
            await conn.invalidate()
            raise
        await conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_MIGRATOR_LOCK})")
        await conn.commit()


async def upgrade_to_head(engine: AsyncEngine) -> None:
    await migrate(engine)


def create_index_online(name: str, table: str, columns: list[str], **kw: Any) -> None:
    """``CREATE INDEX CONCURRENTLY`` inside a revision: writes to ``table`` go on during
    the build. Outside the revision's transaction (Postgres requires it), so an attempt
    that failed may have left an invalid index of that name: dropped first."""
    drop_index_online(name, table)
    with op.get_context().autocommit_block():
        op.create_index(name, table, columns, postgresql_concurrently=True, **kw)


def drop_index_online(name: str, table: str) -> None:
    """``DROP INDEX CONCURRENTLY``: it waits for the queries using the index, not they
    for it."""
    with op.get_context().autocommit_block():
        op.drop_index(name, table_name=table, if_exists=True, postgresql_concurrently=True)
