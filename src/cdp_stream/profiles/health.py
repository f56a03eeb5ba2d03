"""SQL for the console's health page: what the database already knows about the flow.

Events stored in the last hour come from ``events``; dead letters from ``dead_letters``.
Rejected events and consumer lag are read from the Postgres bus's tables, so they are
known here only when the bus is the Postgres one (the default of ``cdp-stream up``): with
Kafka they live in the broker (``kafka-consumer-groups.sh --describe`` shows the lag).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import (
    bus_groups,
    bus_offsets,
    bus_partitions,
    bus_records,
    bus_topics,
    dead_letters,
)


async def recent_dead_letters(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    """The newest parked records: which consumer, where from, why."""
    rows = await conn.execute(select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]


async def consumer_lag(conn: AsyncConnection, namespace: str) -> list[dict[str, Any]]:
    """Per consumer group and topic (of the topics named ``namespace``...), the records
    published that the group has not committed yet."""
    p, o = bus_partitions.c, bus_offsets.c
    lag = func.sum(p.next_offset - o.next_offset).label("lag")
    rows = await conn.execute(
        select(bus_groups.c.name.label("group"), bus_topics.c.name.label("topic"), lag)
        .join(bus_offsets, bus_offsets.c.group_id == bus_groups.c.id)
        .join(bus_partitions, (p.topic_id == o.topic_id) & (p.partition == o.partition))
        .join(bus_topics, bus_topics.c.id == o.topic_id)
        .where(func.starts_with(bus_topics.c.name, namespace))
        .group_by(bus_groups.c.name, bus_topics.c.name)
        .order_by(bus_groups.c.name, bus_topics.c.name)
    )
    return [{"group": r.group, "topic": r.topic, "lag": int(r.lag)} for r in rows]


# The collector writes receivedAt as the record's second key (collector/intake.py); read
# by pattern, since a rejected event may hold what jsonb refuses (\u0000).
_RECEIVED = r'"receivedAt":"([^"]+)"'


async def rejections_since(
    conn: AsyncConnection, topic: str, since: datetime, limit: int
) -> tuple[int, list[dict[str, Any]]]:
    """How many records of the rejected-events topic were received since ``since``, and the
    newest ``limit`` of them (reason, source, messageId, receivedAt), from the Postgres
    bus's log (it keeps a topic no group reads for its retention, an hour by default)."""
    r = bus_records.c
    received = func.substring(func.convert_from(r.value, "UTF8"), _RECEIVED)
    of_topic = (
        r.topic_id == select(bus_topics.c.id).where(bus_topics.c.name == topic).scalar_subquery()
    )
    count = (
        await conn.execute(
            select(func.count()).where(of_topic, received >= since.strftime("%Y-%m-%dT%H:%M:%S"))
        )
    ).scalar_one()
    newest = await conn.execute(
        select(r.value).where(of_topic).order_by(received.desc()).limit(limit)
    )
    items = []
    for (value,) in newest:
        record = orjson.loads(value)
        items.append({k: record.get(k) for k in ("receivedAt", "sourceId", "messageId", "reason")})
    return count, items
