"""Audience membership: who matches each audience's rule (``rules.py``), kept current as
profiles change (``apply_updates``), as time passes (``expire``) and, for a new audience,
over every existing profile (``backfill``).

Membership is always recomputed from the profile as it is now in Postgres, never from the
update's payload, so a redelivered, reordered or stale update changes nothing, and the
three paths agree: one evaluation, one diff. Only a change of membership writes: the
``audience_members`` row appears or goes, and ``audience_changes`` records ``enter`` /
``exit`` at ``now``. A profile that is no longer canonical (merged away) or no longer
exists leaves every audience. Per-profile advisory locks (taken in id order) serialize the
consumer, the expiry timer and back-fills on the same profile; ``INSERT .. ON CONFLICT`` /
``DELETE .. RETURNING`` make sure a change is recorded once even so.

A deleted person's memberships and changes are erased by ``repo.delete_group`` before the
tombstone is published; the tombstone then finds nothing to leave and records nothing, so
the erased profile id is not written back.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    Interval,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from cdp_stream import metrics
from cdp_stream.activation.rules import (
    EventSpec,
    EventView,
    Rule,
    dump_rule,
    evaluate,
    event_specs,
    longest_window,
    parse_rule,
    time_may_admit,
)
from cdp_stream.identity import BUILT_IN
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import Stopping, retrying, stopped_within
from cdp_stream.profiles.models import audience_changes, audience_members, audiences, events
from cdp_stream.profiles.models import profiles as profiles_table
from cdp_stream.profiles.sql import among
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Audience:
    id: uuid.UUID
    rule: Rule


@functools.lru_cache(maxsize=1024)
def _parsed(rule_json: bytes) -> Rule:
    """Rules are parsed once per distinct text, not once per micro-batch."""
    return parse_rule(orjson.loads(rule_json))


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
    found = []
    for row in rows:
        try:
            found.append(Audience(row.id, _parsed(orjson.dumps(row.rule))))
        except ValueError:  # validated on creation: only a hand-edited row gets here
            log.error("audience %s has an invalid rule; skipped", row.id, exc_info=True)
    return found


def _lock_keys(profile_ids: Iterable[uuid.UUID]) -> list[int]:
    return [repo.lock_key("audience-profile", str(pid)) for pid in profile_ids]


async def _load_events(
    conn: AsyncConnection, profile_ids: Sequence[uuid.UUID], rules: Sequence[Rule], now: datetime
) -> dict[uuid.UUID, list[EventView]]:
    """The profiles' events the rules may count: the event types they name, within the
    longest window (events always sit on the canonical profile)."""
    windows = [w for w in map(longest_window, rules) if w is not None]
    types = sorted({spec.type for r in rules for spec, _ in event_specs(r)})
    out: dict[uuid.UUID, list[EventView]] = defaultdict(list)
    if not windows or not profile_ids:
        return out
    rows = await conn.execute(
        select(
            events.c.profile_id, events.c.type, events.c.event, events.c.timestamp, events.c.payload
        ).where(
            among(events.c.profile_id, profile_ids),
            events.c.timestamp > now - max(windows),
            events.c.type.in_(types),
        )
    )
    for r in rows:
        out[r.profile_id].append(
            EventView(type=r.type, event=r.event, timestamp=r.timestamp, payload=r.payload)
        )
    return out


async def _reconcile(
    conn: AsyncConnection,
    chosen: Sequence[Audience],
    profile_ids: Iterable[uuid.UUID],
    now: datetime,
) -> int:
    """Bring membership of ``profile_ids`` in ``chosen`` to what the rules say now; the
    number of enter / exit changes recorded. The caller holds the profiles' locks."""
    ids = sorted(set(profile_ids))
    if not ids or not chosen:
        return 0
    rows = await conn.execute(
        select(profiles_table.c.id, profiles_table.c.traits, profiles_table.c.computed).where(
            among(profiles_table.c.id, ids), profiles_table.c.merged_into.is_(None)
        )
    )
    canonical = {r.id: {"traits": r.traits, "computed": r.computed} for r in rows}
    timeline = await _load_events(conn, list(canonical), [a.rule for a in chosen], now)
    wanted = {
        (a.id, pid)
        for pid, profile in canonical.items()
        for a in chosen
        if evaluate(a.rule, profile, timeline.get(pid, []), now)
    }
    aids = [a.id for a in chosen]
    current = {
        (r.audience_id, r.profile_id)
        for r in await conn.execute(
            select(audience_members.c.audience_id, audience_members.c.profile_id).where(
                among(audience_members.c.profile_id, ids),
                among(audience_members.c.audience_id, aids),
            )
        )
    }
    changes: list[dict[str, Any]] = []
    entering = sorted(wanted - current)
    if entering:
        entered = await conn.execute(
            pg_insert(audience_members)
            .values([{"audience_id": a, "profile_id": p, "entered_at": now} for a, p in entering])
            .on_conflict_do_nothing()
            .returning(audience_members.c.audience_id, audience_members.c.profile_id)
        )
        changes += [{"audience_id": a, "profile_id": p, "change": "enter"} for a, p in entered]
    leaving = sorted(current - wanted)
    if leaving:
        member = tuple_(audience_members.c.audience_id, audience_members.c.profile_id)
        left = await conn.execute(
            delete(audience_members)
            .where(member.in_(leaving))
            .returning(audience_members.c.audience_id, audience_members.c.profile_id)
        )
        changes += [{"audience_id": a, "profile_id": p, "change": "exit"} for a, p in left]
    if changes:
        await conn.execute(insert(audience_changes), [{**c, "at": now} for c in changes])
        for c in changes:
            metrics.audience_transitions.labels(c["change"]).inc()
    return len(changes)


def _profile_ids(updates: Sequence[ProfileUpdate]) -> set[uuid.UUID]:
    """Every profile an update names: the profile, and those merged into it (or, for a
    deletion tombstone, erased with it)."""
    ids: set[uuid.UUID] = set()
    for update_ in updates:
        for raw in [update_.profile_id, *update_.merged_ids]:
            try:
                ids.add(uuid.UUID(str(raw)))
            except ValueError:
                log.warning("skipping a profile id that is not a UUID: %r", raw)
    return ids


async def apply_updates(
    conn: AsyncConnection, updates: Sequence[ProfileUpdate], now: datetime
) -> None:
    """Re-evaluate every audience for the profiles a micro-batch of profile updates names,
    inside the caller's transaction. Merged-away and deleted profiles leave everything."""
    ids = sorted(_profile_ids(updates))
    if not ids:
        return
    chosen = await load_audiences(conn)
    if not chosen:
        return
    await repo.lock_keys(conn, _lock_keys(ids))
    await _reconcile(conn, chosen, ids, now)


def _interval(value: timedelta) -> ColumnElement[timedelta]:
    return literal(value, Interval())


def _at(value: datetime) -> ColumnElement[datetime]:
    return literal(value, DateTime(timezone=True))


def _same_kind(spec: EventSpec) -> list[ColumnElement[bool]]:
    """SQL for the part of ``rules.matches`` an index can help with: type and name."""
    clauses: list[ColumnElement[bool]] = [events.c.type == spec.type]
    if spec.name is not None:
        clauses.append(func.lower(func.btrim(events.c.event)) == spec.name.strip().lower())
    return clauses


async def _crossed(
    conn: AsyncConnection, audience: Audience, now: datetime, since: datetime | None
) -> set[uuid.UUID]:
    """Profiles for which an event the rule counts left its window after the last check
    (``since``) and by ``now``: the only ones whose answer time alone can have changed.

    Members: events that left after the member entered (before that, entering already
    saw them gone), so without ``since`` (the first run after a start) the catch-up is
    exact whatever the downtime. Non-members, only for rules time can admit ("did not
    visit in 7 days"): events that left after ``since``, or within the last window when
    there is no ``since``.
    """
    found: set[uuid.UUID] = set()
    for spec, _ in event_specs(audience.rule):
        # "left its window by now" is "timestamp <= now - window": bounds on the column
        # itself, so the (profile_id, timestamp) index serves them
        left_by_now = events.c.timestamp <= _at(now - spec.window)
        members = (
            select(audience_members.c.profile_id)
            .join(events, events.c.profile_id == audience_members.c.profile_id)
            .where(
                audience_members.c.audience_id == audience.id,
                *_same_kind(spec),
                left_by_now,
                events.c.timestamp >= audience_members.c.entered_at - _interval(spec.window),
            )
            .distinct()
        )
        if since is not None:
            members = members.where(events.c.timestamp > _at(since - spec.window))
        found.update((await conn.execute(members)).scalars())
        if time_may_admit(audience.rule):
            lower = (since if since is not None else now - spec.window) - spec.window
            anyone = (
                select(events.c.profile_id)
                .where(*_same_kind(spec), left_by_now, events.c.timestamp > _at(lower))
                .distinct()
            )
            found.update((await conn.execute(anyone)).scalars())
    return found


async def expire(conn: AsyncConnection, now: datetime, since: datetime | None = None) -> int:
    """Re-evaluate the profiles whose counted events have left a time-window audience's
    window (as time passes, without any new event) and record who exits (or, for "did not
    ... in the last N days" rules, enters). ``since``: the previous run's ``now``, to look
    only at what crossed since; None catches up from each membership's start. Returns
    the number of changes recorded."""
    chosen = [a for a in await load_audiences(conn) if longest_window(a.rule) is not None]
    candidates = {a.id: await _crossed(conn, a, now, since) for a in chosen}
    everyone = set().union(*candidates.values())
    if not everyone:
        return 0
    await repo.lock_keys(conn, _lock_keys(everyone))  # all at once, in order: no deadlock
    return sum([await _reconcile(conn, [a], candidates[a.id], now) for a in chosen])


async def run_expiry(engine: AsyncEngine, stop: asyncio.Event, interval_s: float) -> None:
    """``expire`` every ``interval_s`` until ``stop``; each run looks only at windows
    crossed since the previous successful one (the first catches up)."""
    since: datetime | None = None
    while not stop.is_set():
        now = datetime.now(UTC)
        try:
            changed = await retrying(engine, functools.partial(expire, now=now, since=since), stop)
        except Stopping:
            return
        except Exception:  # a timer that dies silently would freeze memberships
            log.exception("audience expiry failed; retrying next interval")
        else:
            since = now
            if changed:
                log.info("audience expiry: %d membership changes", changed)
        await stopped_within(stop, interval_s)


# --- audiences themselves: create, read, delete, back-fill ------------------------------


async def create_audience(conn: AsyncConnection, name: str, rule: Rule) -> uuid.UUID | None:
    """A new audience (its back-fill pending); None if the name is taken."""
    row = await conn.execute(
        pg_insert(audiences)
        .values(
            id=uuid.uuid4(),
            name=name,
            rule=dump_rule(rule),
            backfill={"status": "pending", "processed": 0, "total": None},
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(audiences.c.id)
    )
    created: uuid.UUID | None = row.scalar_one_or_none()
    return created


async def audience_exists(conn: AsyncConnection, audience_id: uuid.UUID) -> bool:
    """Whether it exists, without counting its members as ``read_audience`` does."""
    found = await conn.execute(select(audiences.c.id).where(audiences.c.id == audience_id))
    return found.first() is not None


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
MEMBER_COLUMNS = ("profile_id", "entered_at", *BUILT_IN)
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
EXPORT_CHUNK = 1000  # members per CSV chunk (and per fetch from the cursor)


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


async def members_csv(engine: AsyncEngine, audience_id: uuid.UUID) -> AsyncIterator[bytes]:
    """Every member as CSV (:data:`MEMBER_COLUMNS`), a header then one chunk per
    :data:`EXPORT_CHUNK` members: a server-side cursor in one snapshot, so memory holds one
    chunk whatever the audience's size."""
    yield _csv_lines([MEMBER_COLUMNS])
    async with engine.connect() as conn:
        query = _MEMBERS.bindparams(
            audience=audience_id, after=_FIRST, limit=None, types=list(BUILT_IN)
        )
        result = await conn.stream(query, execution_options={"yield_per": EXPORT_CHUNK})
        async for rows in result.partitions():
            yield _csv_lines(
                [
                    [
                        str(r.profile_id),
                        r.entered_at.isoformat(),
                        *((r.identifiers or {}).get(t, "") for t in BUILT_IN),
                    ]
                    for r in rows
                ]
            )


def _csv_lines(rows: Iterable[Sequence[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


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
        values["backfill"] = {"status": "pending", "processed": 0, "total": None}
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


async def _progress(conn: AsyncConnection, audience_id: uuid.UUID, **progress: Any) -> None:
    await conn.execute(
        update(audiences).where(audiences.c.id == audience_id).values(backfill=progress)
    )


async def backfill(engine: AsyncEngine, audience_id: uuid.UUID, batch: int = 500) -> None:
    """Evaluate every canonical profile for a new audience, ``batch`` at a time, each batch
    its own transaction (so the consumer is never held up for long), recording
    ``{"status", "processed", "total"}`` in ``audiences.backfill``. Profiles changing
    meanwhile are safe: the consumer evaluates them too, against the same state. Stops
    quietly if the audience is deleted; rerunning it is harmless (it records only real
    changes)."""

    async def start(conn: AsyncConnection) -> int | None:
        if not await load_audiences(conn, [audience_id]):
            return None
        total: int = (
            await conn.execute(select(func.count()).where(profiles_table.c.merged_into.is_(None)))
        ).scalar_one()
        await _progress(conn, audience_id, status="running", processed=0, total=total)
        return total

    total = await retrying(engine, start)
    if total is None:
        return
    processed, after = 0, None

    async def step(conn: AsyncConnection) -> list[uuid.UUID] | None:
        chosen = await load_audiences(conn, [audience_id])
        if not chosen:
            return None
        query = select(profiles_table.c.id).where(profiles_table.c.merged_into.is_(None))
        if after is not None:
            query = query.where(profiles_table.c.id > after)
        ids = list((await conn.execute(query.order_by(profiles_table.c.id).limit(batch))).scalars())
        await repo.lock_keys(conn, _lock_keys(ids))
        await _reconcile(conn, chosen, ids, datetime.now(UTC))
        done = len(ids) < batch
        count = processed + len(ids)
        await _progress(
            conn,
            audience_id,
            status="done" if done else "running",
            processed=count,
            total=count if done else max(total, count),
        )
        return ids

    try:
        while True:
            ids = await retrying(engine, step)
            if ids is None:
                return
            processed += len(ids)
            if len(ids) < batch:
                return
            after = ids[-1]
    except Exception as exc:
        with contextlib.suppress(Exception):
            async with engine.begin() as conn:
                await _progress(
                    conn,
                    audience_id,
                    status="failed",
                    processed=processed,
                    total=total,
                    error=str(exc),
                )
        raise


_BACKFILLS: set[asyncio.Task[None]] = set()


def start_backfill(engine: AsyncEngine, audience_id: uuid.UUID) -> asyncio.Task[None]:
    """Run ``backfill`` in the background, keeping a reference to the task (the event
    loop holds only weak ones) and logging its failure."""
    task = asyncio.create_task(backfill(engine, audience_id), name=f"backfill-{audience_id}")
    _BACKFILLS.add(task)

    def done(t: asyncio.Task[None]) -> None:
        _BACKFILLS.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("back-fill of audience %s failed", audience_id, exc_info=t.exception())

    task.add_done_callback(done)
    return task


async def stop_backfills() -> None:
    """Cancel running back-fills (at shutdown); ``resume_backfills`` restarts them."""
    tasks = list(_BACKFILLS)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def resume_backfills(engine: AsyncEngine, stop: asyncio.Event | None = None) -> int:
    """Start again the back-fills a stop interrupted (status pending / running): they are
    idempotent, so starting over is safe. Returns how many were started."""

    async def interrupted(conn: AsyncConnection) -> list[uuid.UUID]:
        rows = await conn.execute(
            select(audiences.c.id).where(
                audiences.c.backfill["status"].astext.in_(["pending", "running"])
            )
        )
        return list(rows.scalars())

    ids = await retrying(engine, interrupted, stop)
    for audience_id in ids:
        start_backfill(engine, audience_id)
    return len(ids)
