"""SQL for the dead-letter count: one row per parked record (the record itself is on the
dead-letter topic), so ``/metrics`` counts what every consumer process parked."""

from __future__ import annotations

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import dead_letters


async def record(conn: AsyncConnection, consumer: str, origin: str, reason: str) -> None:
    await conn.execute(insert(dead_letters).values(consumer=consumer, origin=origin, reason=reason))


async def counts(conn: AsyncConnection) -> dict[str, int]:
    """Parked records per consumer."""
    rows = await conn.execute(
        select(dead_letters.c.consumer, func.count()).group_by(dead_letters.c.consumer)
    )
    return {consumer: n for consumer, n in rows}
