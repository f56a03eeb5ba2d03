"""The DMP feed's persistence: the facts of an audience's members (one streamed statement),
``dmp_audience_counts`` (the counts as last published) and the API's reads of them.
SQLAlchemy Core only; each function runs in the caller's transaction.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, or_, select, true
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.activation.dmp.anonymize import OVERALL, Cell, Tally
from cdp_stream.activation.dmp.consent import opted_out
from cdp_stream.activation.dmp.facts import Facts
from cdp_stream.profiles.models import (
    audience_members,
    dmp_audience_counts,
    events,
    profiles,
)
from cdp_stream.profiles.repository import lock_key

Stored = dict[Cell, tuple[int | None, float | None]]  # cell -> (count, epsilon)


def _latest(alias: str, pid: Any, paths: list[tuple[str, ...]], labels: list[str]) -> Any:
    """A lateral subquery: ``context.<path>`` of the profile's latest event carrying any
    of ``paths`` (one row at most)."""
    e = events.alias(alias)
    columns = [
        e.c.payload[("context", *p)].label(lbl) for p, lbl in zip(paths, labels, strict=True)
    ]
    carrying = or_(*(e.c.payload[("context", *p)].is_not(None) for p in paths))
    return (
        select(*columns)
        .where(e.c.profile_id == pid, carrying)
        .order_by(e.c.timestamp.desc(), e.c.id.desc())
        .limit(1)
        .lateral(alias)
    )


def _facts_query(audience_id: uuid.UUID, dimensions: Iterable[str]) -> Select[Any]:
    """One row of facts per distinct canonical member of the audience."""
    member = profiles.alias("member")
    canonical = func.coalesce(member.c.merged_into, member.c.id).label("pid")
    members = (
        select(canonical)
        .select_from(audience_members.join(member, member.c.id == audience_members.c.profile_id))
        .where(audience_members.c.audience_id == audience_id)
        .distinct()
        .subquery("members")
    )
    p = profiles
    stmt = (
        select(
            p.c.traits["consent"].label("t_consent"),
            p.c.traits["address"].label("t_address"),
            p.c.traits["country"].label("t_country"),
            p.c.computed["first_touch"].label("first_touch"),
        )
        .select_from(members.join(p, p.c.id == members.c.pid))
        .where(p.c.merged_into.is_(None))
    )
    laterals: list[tuple[str, list[tuple[str, ...]], list[str]]] = [
        ("consent_ev", [("consent",)], ["c_consent"])
    ]
    if "country" in dimensions:
        laterals.append(("location_ev", [("location", "country")], ["c_country"]))
    if "device_type" in dimensions:
        laterals.append(
            ("device_ev", [("device", "type"), ("userAgent",)], ["c_device_type", "c_agent"])
        )
    for alias, paths, labels in laterals:
        lateral = _latest(alias, p.c.id, paths, labels)
        stmt = stmt.outerjoin(lateral, true()).add_columns(*(lateral.c[lbl] for lbl in labels))
    return stmt


def _facts(row: Mapping[str, Any]) -> Facts:
    device = {"type": row.get("c_device_type")}
    return Facts(
        traits={
            "consent": row["t_consent"],
            "address": row["t_address"],
            "country": row["t_country"],
        },
        computed={"first_touch": row["first_touch"]},
        context={
            "consent": row["c_consent"],
            "location": {"country": row.get("c_country")},
            "device": device,
            "userAgent": row.get("c_agent"),
        },
    )


async def tally(conn: AsyncConnection, audience_id: uuid.UUID, dimensions: list[str]) -> Tally:
    """The exact counts of the audience's consenting members, in one statement (one
    snapshot), streamed: an audience of millions is never held in memory.

    Cost: per member, up to three backward walks of its timeline (the profile/timestamp
    index) to the latest event carrying consent, a location or a device; a profile that
    never sent ``context.consent`` is walked to its first event. Should that grow heavy,
    the resolver can fold these into ``computed`` and this becomes a scan of profiles."""
    out = Tally(buckets={name: Counter() for name in dimensions})
    result = await conn.stream(_facts_query(audience_id, dimensions))
    async for row in result.mappings():
        facts = _facts(row)
        if not opted_out(facts):
            out.add(facts, dimensions)
    return out


async def try_lock(conn: AsyncConnection, audience_id: uuid.UUID) -> bool:
    """Take the audience's counting lock for the transaction, unless another activation
    process holds it (then it is counting the audience right now)."""
    key = lock_key("dmp", str(audience_id))
    return bool((await conn.execute(select(func.pg_try_advisory_xact_lock(key)))).scalar())


def _window(audience_id: uuid.UUID, window: str, start: datetime) -> list[Any]:
    t = dmp_audience_counts.c
    return [t.audience_id == audience_id, t.window == window, t.window_start == start]


async def stored_counts(
    conn: AsyncConnection, audience_id: uuid.UUID, window: str, start: datetime
) -> Stored:
    """The counts stored (published) for the audience's window starting at ``start``."""
    t = dmp_audience_counts.c
    rows = await conn.execute(
        select(t.dimension, t.bucket, t.count, t.epsilon).where(
            *_window(audience_id, window, start)
        )
    )
    return {(dimension, bucket): (n, e) for dimension, bucket, n, e in rows}


async def write_counts(
    conn: AsyncConnection,
    audience_id: uuid.UUID,
    window: str,
    start: datetime,
    counts: Mapping[Cell, int],
    epsilon: float | None,
) -> None:
    """Store (insert or replace) counts of the audience's window."""
    stmt = insert(dmp_audience_counts)
    await conn.execute(
        stmt.on_conflict_do_update(
            constraint="dmp_audience_counts_key",
            set_={"count": stmt.excluded.count, "epsilon": stmt.excluded.epsilon},
        ),
        [
            {
                "audience_id": audience_id,
                "window": window,
                "window_start": start,
                "dimension": dimension,
                "bucket": bucket,
                "count": n,
                "epsilon": epsilon,
            }
            for (dimension, bucket), n in sorted(counts.items())
        ],
    )


async def withdraw_counts(
    conn: AsyncConnection,
    audience_id: uuid.UUID,
    window: str,
    start: datetime,
    cells: Iterable[Cell],
) -> None:
    """Delete stored counts of the audience's window (buckets no longer published)."""
    t = dmp_audience_counts.c
    for dimension, bucket in cells:
        await conn.execute(
            delete(dmp_audience_counts).where(
                *_window(audience_id, window, start), t.dimension == dimension, t.bucket == bucket
            )
        )


async def read_counts(
    conn: AsyncConnection,
    *,
    audience_id: uuid.UUID | None = None,
    window: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Stored counts, newest window first: exactly the published fields."""
    t = dmp_audience_counts.c
    stmt = select(
        t.audience_id, t.window, t.window_start, t.dimension, t.bucket, t.count, t.epsilon
    )
    if audience_id is not None:
        stmt = stmt.where(t.audience_id == audience_id)
    if window is not None:
        stmt = stmt.where(t.window == window)
    if since is not None:
        stmt = stmt.where(t.window_start >= since)
    stmt = stmt.order_by(
        t.window_start.desc(),
        t.audience_id,
        t.window,
        t.dimension != OVERALL,
        t.dimension,
        t.bucket,
    ).limit(limit)
    return [dict(r._mapping) for r in await conn.execute(stmt)]
