"""Audiences' persistence: ``audiences``, ``audience_members``, ``audience_changes``, and
the profile and event reads a rule is evaluated on. SQLAlchemy Core only; each function
runs in the caller's transaction. What to write is decided in ``membership.py`` and
``backfill.py`` (from ``matching.py``), what to show in the API's router.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    Interval,
    Row,
    Text,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from cdp_stream.activation.audiences.matching import Audience, Member, audiences_of_rows
from cdp_stream.activation.audiences.rules import EventSpec, EventView, Rule, dump_rule
from cdp_stream.identity import BUILT_IN
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import audience_changes, audience_members, audiences, events
from cdp_stream.profiles.models import profiles as profiles_table
from cdp_stream.profiles.sql import among, name_key_of, unnested

_PENDING = {"status": "pending", "processed": 0, "total": None}


async def load_audiences(
    conn: AsyncConnection, ids: Sequence[uuid.UUID] | None = None
) -> list[Audience]:
    """The audiences, share-locked (``FOR KEY SHARE``) until the transaction ends: one
    deleted meanwhile cannot leave member rows pointing at nothing (a foreign-key error
    that would stop the consumer), and one already deleted is simply not here."""
    query = select(audiences.c.id, audiences.c.rule).order_by(audiences.c.id)
    if ids is not None:
        query = query.where(audiences.c.id.in_(ids))
    rows = await conn.execute(query.with_for_update(key_share=True))
    return audiences_of_rows((r.id, r.rule) for r in rows)


async def lock_profiles(conn: AsyncConnection, profile_ids: Iterable[uuid.UUID]) -> None:
    """Serialize the consumer, the expiry timer and back-fills per profile (in id order:
    no deadlock)."""
    await repo.lock_keys(conn, [repo.lock_key("audience-profile", str(p)) for p in profile_ids])


async def load_events(
    conn: AsyncConnection,
    profile_ids: Sequence[uuid.UUID],
    *,
    since: datetime,
    types: Sequence[str],
    names: Sequence[tuple[str, str]],
    payloads: bool,
) -> dict[uuid.UUID, list[EventView]]:
    """The profiles' events after ``since`` of ``types`` (any name) or of ``names``
    (type, stripped lower-case event name), and maybe a few more (a name within a longer
    one, or another condition's): the rules count only what they match. Events always
    sit on the canonical profile. Without ``payloads`` every payload is read as empty."""
    patterns = sorted({"%" + re.sub(r"([\\%_])", r"\\\1", n) + "%" for _, n in names})
    kinds = among(events.c.type, types) | (
        among(events.c.type, sorted({t for t, _ in names}))
        & func.lower(events.c.event).like(any_(bindparam(None, patterns, type_=ARRAY(Text))))
    )
    empty = literal_column("'{}'::jsonb", JSONB)
    payload = (events.c.payload if payloads else empty).label("payload")
    out: dict[uuid.UUID, list[EventView]] = defaultdict(list)
    rows = await conn.execute(
        select(
            events.c.profile_id, events.c.type, events.c.event, events.c.timestamp, payload
        ).where(among(events.c.profile_id, profile_ids), events.c.timestamp > since, kinds)
    )
    for r in rows:
        out[r.profile_id].append(
            EventView(type=r.type, event=r.event, timestamp=r.timestamp, payload=r.payload)
        )
    return out


async def current_members(
    conn: AsyncConnection, profile_ids: Sequence[uuid.UUID], audience_ids: Sequence[uuid.UUID]
) -> set[Member]:
    rows = await conn.execute(
        select(audience_members.c.audience_id, audience_members.c.profile_id).where(
            among(audience_members.c.profile_id, profile_ids),
            among(audience_members.c.audience_id, audience_ids),
        )
    )
    return {(r.audience_id, r.profile_id) for r in rows}


async def enter(conn: AsyncConnection, pairs: list[Member], now: datetime) -> list[Member]:
    """Add members (entered at ``now``); those really added (not there already)."""
    names = ("audience_id", "profile_id", "entered_at")
    rows = [{"audience_id": a, "profile_id": p, "entered_at": now} for a, p in pairs]
    entered = await conn.execute(
        pg_insert(audience_members)
        .from_select(names, unnested(audience_members, names, rows))
        .on_conflict_do_nothing()
        .returning(audience_members.c.audience_id, audience_members.c.profile_id)
    )
    return [(a, p) for a, p in entered]


async def leave(conn: AsyncConnection, pairs: list[Member]) -> list[Member]:
    """Remove members; those really removed."""
    member = tuple_(audience_members.c.audience_id, audience_members.c.profile_id)
    names = ("audience_id", "profile_id")
    rows = [{"audience_id": a, "profile_id": p} for a, p in pairs]
    left = await conn.execute(
        delete(audience_members)
        .where(member.in_(unnested(audience_members, names, rows)))
        .returning(audience_members.c.audience_id, audience_members.c.profile_id)
    )
    return [(a, p) for a, p in left]


async def record_changes(conn: AsyncConnection, changes: list[dict[str, Any]]) -> None:
    """Append ``enter`` / ``exit`` rows (``audience_id``, ``profile_id``, ``change``, ``at``)."""
    await conn.execute(insert(audience_changes), changes)


def _interval(value: timedelta) -> ColumnElement[timedelta]:
    return literal(value, Interval())


def _at(value: datetime) -> ColumnElement[datetime]:
    return literal(value, DateTime(timezone=True))


def _same_kind(spec: EventSpec) -> list[ColumnElement[bool]]:
    """SQL for the part of ``rules.matches`` an index can help with: type and name."""
    clauses: list[ColumnElement[bool]] = [events.c.type == spec.type]
    if spec.normal_name is not None:
        clauses.append(name_key_of(events.c.event) == spec.normal_name)
    return clauses


async def members_with_events_left(
    conn: AsyncConnection,
    audience_id: uuid.UUID,
    spec: EventSpec,
    now: datetime,
    since: datetime | None,
) -> set[uuid.UUID]:
    """Members with an event of ``spec`` that left its window by ``now``, after the member
    entered (before that, entering already saw it gone) and, given ``since``, after
    ``since``."""
    # "left its window by now" is "timestamp <= now - window": bounds on the column
    # itself, so the (profile_id, timestamp) index serves them
    members = (
        select(audience_members.c.profile_id)
        .join(events, events.c.profile_id == audience_members.c.profile_id)
        .where(
            audience_members.c.audience_id == audience_id,
            *_same_kind(spec),
            events.c.timestamp <= _at(now - spec.window),
            events.c.timestamp >= audience_members.c.entered_at - _interval(spec.window),
        )
        .distinct()
    )
    if since is not None:
        members = members.where(events.c.timestamp > _at(since - spec.window))
    return set((await conn.execute(members)).scalars())


async def profiles_with_events_left(
    conn: AsyncConnection, spec: EventSpec, now: datetime, after: datetime
) -> set[uuid.UUID]:
    """Any profile with an event of ``spec`` stamped after ``after`` that left its window
    by ``now``."""
    anyone = (
        select(events.c.profile_id)
        .where(
            *_same_kind(spec),
            events.c.timestamp <= _at(now - spec.window),
            events.c.timestamp > _at(after),
        )
        .distinct()
    )
    return set((await conn.execute(anyone)).scalars())


# --- audiences themselves: create, read, delete ------------------------------------------


async def create_audience(conn: AsyncConnection, name: str, rule: Rule) -> uuid.UUID | None:
    """A new audience (its back-fill pending); None if the name is taken."""
    row = await conn.execute(
        pg_insert(audiences)
        .values(id=uuid.uuid4(), name=name, rule=dump_rule(rule), backfill=_PENDING)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(audiences.c.id)
    )
    created: uuid.UUID | None = row.scalar_one_or_none()
    return created


async def audience_exists(conn: AsyncConnection, audience_id: uuid.UUID) -> bool:
    """Whether it exists, without counting its members as ``read_audience`` does."""
    found = await conn.execute(select(audiences.c.id).where(audiences.c.id == audience_id))
    return found.first() is not None


async def audience_ids(conn: AsyncConnection) -> list[uuid.UUID]:
    """Every audience's id, in order."""
    return list((await conn.execute(select(audiences.c.id).order_by(audiences.c.id))).scalars())


def _with_size() -> Any:
    size = (
        select(func.count())
        .where(audience_members.c.audience_id == audiences.c.id)
        .scalar_subquery()
        .label("size")
    )
    return select(audiences, size)


def _info(row: Any) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "name": row.name,
        "rule": row.rule,
        "size": row.size,
        "backfill": row.backfill,
        "created_at": row.created_at,
    }


async def read_audience(conn: AsyncConnection, audience_id: uuid.UUID) -> dict[str, Any] | None:
    """The audience with its current size and back-fill progress."""
    row = (await conn.execute(_with_size().where(audiences.c.id == audience_id))).one_or_none()
    return None if row is None else _info(row)


async def list_audiences(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(_with_size().order_by(audiences.c.name))
    return [_info(r) for r in rows]


# A member with its main identifiers: per built-in type the value linked most recently
# (a person's current email, their latest device), from the identities index.
_MEMBERS = text(
    """
SELECT m.profile_id, m.entered_at, (
  SELECT json_object_agg(f.type, f.value) FROM (
    SELECT DISTINCT ON (i.type) i.type, i.value FROM identities i
    WHERE i.profile_id = m.profile_id AND i.type = ANY(CAST(:types AS text[]))
    ORDER BY i.type, i.created_at DESC, i.value
  ) f
) AS identifiers
FROM audience_members m
WHERE m.audience_id = :audience AND m.profile_id > :after
ORDER BY m.profile_id LIMIT :limit
"""
).columns(profile_id=UUID(as_uuid=True), entered_at=DateTime(timezone=True), identifiers=JSON)
_FIRST = uuid.UUID(int=0)


def _member(row: Any) -> dict[str, Any]:
    return {
        "profile_id": str(row.profile_id),
        "entered_at": row.entered_at,
        "identifiers": row.identifiers or {},
    }


async def read_members(
    conn: AsyncConnection, audience_id: uuid.UUID, *, after: uuid.UUID | None, limit: int
) -> list[dict[str, Any]]:
    """A page of an audience's members in profile id order, after ``after``."""
    params = {"audience": audience_id, "after": after or _FIRST, "limit": limit}
    rows = await conn.execute(_MEMBERS, {**params, "types": list(BUILT_IN)})
    return [_member(r) for r in rows]


async def stream_members(
    conn: AsyncConnection, audience_id: uuid.UUID, chunk: int
) -> AsyncIterator[Sequence[Row[Any]]]:
    """Every member (``profile_id``, ``entered_at``, ``identifiers``), ``chunk`` rows at a
    time from a server-side cursor, in one snapshot."""
    query = _MEMBERS.bindparams(
        audience=audience_id, after=_FIRST, limit=None, types=list(BUILT_IN)
    )
    result = await conn.stream(query, execution_options={"yield_per": chunk})
    async for rows in result.partitions():
        yield rows


async def audiences_of(conn: AsyncConnection, profile_id: uuid.UUID) -> list[dict[str, Any]]:
    """The audiences a canonical profile is in, with when it entered each."""
    rows = await conn.execute(
        select(audiences.c.id, audiences.c.name, audience_members.c.entered_at)
        .join(audience_members, audience_members.c.audience_id == audiences.c.id)
        .where(audience_members.c.profile_id == profile_id)
        .order_by(audiences.c.name)
    )
    return [{"id": str(r.id), "name": r.name, "entered_at": r.entered_at} for r in rows]


async def delete_audience(conn: AsyncConnection, audience_id: uuid.UUID) -> bool:
    """Delete it with its members and changes (cascade); False if there is none."""
    gone = await conn.execute(
        delete(audiences).where(audiences.c.id == audience_id).returning(audiences.c.id)
    )
    return gone.first() is not None


async def update_audience(
    conn: AsyncConnection, audience_id: uuid.UUID, name: str | None, rule: Rule | None
) -> bool | None:
    """Rename it and/or give it a new rule (its back-fill pending again: the caller starts
    it once this commits, and it re-evaluates every profile, so members the new rule no
    longer admits exit). None if there is no such audience, False if the name is taken."""
    values: dict[str, Any] = {}
    if name is not None:
        taken = await conn.execute(
            select(audiences.c.id).where(audiences.c.name == name, audiences.c.id != audience_id)
        )
        if taken.first() is not None:
            return False
        values["name"] = name
    if rule is not None:
        values["rule"] = dump_rule(rule)
        values["backfill"] = _PENDING
    stmt = update(audiences).where(audiences.c.id == audience_id).returning(audiences.c.id)
    changed = await conn.execute(stmt.values(values or {"name": audiences.c.name}))
    return None if changed.first() is None else True


async def size_history(
    conn: AsyncConnection, audience_id: uuid.UUID, step: str, points: int
) -> list[dict[str, Any]]:
    """The audience's size at the end of each ``step`` (minute / hour / day) in which it
    changed, from its enter / exit history: the last ``points`` of them, oldest first."""
    t = audience_changes.c
    at = func.date_trunc(step, t.at).label("at")
    delta = func.sum(func.cast(t.change == "enter", Integer) * 2 - 1).label("delta")
    per_step = select(at, delta).where(t.audience_id == audience_id).group_by(at).subquery()
    size = func.sum(per_step.c.delta).over(order_by=per_step.c.at)
    rows = await conn.execute(
        select(per_step.c.at, size.label("size")).order_by(per_step.c.at.desc()).limit(points)
    )
    return [{"at": r.at, "size": int(r.size)} for r in reversed(rows.all())]


# --- back-fills -------------------------------------------------------------------------


async def set_progress(conn: AsyncConnection, audience_id: uuid.UUID, **progress: Any) -> None:
    """Record a back-fill's ``{"status", "processed", "total", ...}``."""
    await conn.execute(
        update(audiences).where(audiences.c.id == audience_id).values(backfill=progress)
    )


async def count_canonical(conn: AsyncConnection) -> int:
    total: int = (
        await conn.execute(select(func.count()).where(profiles_table.c.merged_into.is_(None)))
    ).scalar_one()
    return total


async def canonical_page(
    conn: AsyncConnection, after: uuid.UUID | None, limit: int
) -> list[uuid.UUID]:
    """The next ``limit`` canonical profile ids after ``after``, in order."""
    query = select(profiles_table.c.id).where(profiles_table.c.merged_into.is_(None))
    if after is not None:
        query = query.where(profiles_table.c.id > after)
    return list((await conn.execute(query.order_by(profiles_table.c.id).limit(limit))).scalars())


async def interrupted_backfills(conn: AsyncConnection) -> list[uuid.UUID]:
    """Audiences whose back-fill a stop interrupted (pending or running)."""
    rows = await conn.execute(
        select(audiences.c.id).where(
            audiences.c.backfill["status"].astext.in_(["pending", "running"])
        )
    )
    return list(rows.scalars())
