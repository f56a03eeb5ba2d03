"""Bring the schema to the newest Alembic revision (``cdp-stream migrate``; ``up`` runs it).

Alembic runs on a connection we hand it, so migrating works inside a running event loop
and on the same engine the stages use.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


async def upgrade_to_head(engine: AsyncEngine) -> None:
    def run(connection: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        # One migrator at a time when several processes start together.
        await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727001)")
        await conn.run_sync(run)
