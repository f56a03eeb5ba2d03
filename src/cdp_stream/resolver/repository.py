"""The resolver's persistence: what a batch reads and writes (profiles and their states,
identities, refusals, events, orders and their totals, merges) and what an unmerge
rewrites (regrouped atoms, the merge log, splits).

Callers own the transaction. Invariant kept by the writers: an identity always points
at a canonical profile (``merged_into IS NULL``). The profile updates a transaction
writes go through :mod:`cdp_stream.profiles.outbox`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import UUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Subquery

from cdp_stream.identity import Identifier
from cdp_stream.profiles.models import (
    events,
    identities,
    orders,
    profile_merges,
    profile_splits,
    profiles,
)
from cdp_stream.profiles.repository import copy_records, driver, group_ids
from cdp_stream.resolver.orders import Fact, fields
from cdp_stream.resolver.traits import view as trait_view
from cdp_stream.sealing import SuppressionKeys

_BATCH_READS = """
SELECT 0, e.source_id, e.message_id, NULL::uuid FROM events e
  JOIN unnest($1::text[], $2::text[]) AS k(s, m) ON e.source_id = k.s AND e.message_id = k.m
UNION ALL
SELECT 1, i.type, i.value, i.profile_id FROM identities i
  JOIN unnest($3::text[], $4::text[]) AS k(t, v) ON i.type = k.t AND i.value = k.v
UNION ALL
SELECT 2, s.digest, NULL, NULL FROM suppressed_identifiers s WHERE s.digest = ANY($5::text[])
"""


@dataclass(slots=True)
class BatchReads:
    """What a batch reads before it locks profiles, in one round trip."""

    stored: set[tuple[str, str]]  # (source_id, message_id) pairs already stored
    owners: dict[Identifier, uuid.UUID]  # the profile holding each identifier
    suppressed: set[Identifier]  # identifiers of deleted people


async def batch_reads(
    conn: AsyncConnection,
    keys: Sequence[tuple[str, str]],
    ids: Sequence[Identifier],
    suppression: SuppressionKeys,
) -> BatchReads:
    """Which events are stored already, who holds each identifier, which belong to deleted
    people: one statement on the driver's connection (arrays, not IN lists: one plan per
    connection; asyncpg's records, not SQLAlchemy's rows: thousands per batch)."""
    by_digest = {d: i for i in ids for d in suppression.candidates(i.type, i.value)}
    params = (
        [s for s, _ in keys],
        [m for _, m in keys],
        [i.type for i in ids],
        [i.value for i in ids],
        list(by_digest),
    )
    rows = await driver(conn, lambda db: db.fetch(_BATCH_READS, *params))
    out = BatchReads(set(), {}, set())
    for kind, a, b, pid in rows:
        if kind == 0:
            out.stored.add((a, b))
        elif kind == 1:
            out.owners[Identifier(a, b)] = pid
        else:
            out.suppressed.add(by_digest[a])
    return out


@dataclass(frozen=True, slots=True)
class ProfileState:
    trait_state: dict[str, Any]
    computed: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LockedProfile:
    merged_into: uuid.UUID | None
    created_at: datetime
    state: ProfileState


_LOCK_PROFILES = """SELECT id, merged_into, created_at, trait_state, computed FROM profiles
WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE"""


async def lock_profiles(
    conn: AsyncConnection, ids: Iterable[uuid.UUID], skip_locked: bool = False
) -> dict[uuid.UUID, LockedProfile]:
    """Row-lock the profiles in id order (concurrent resolvers queue, never deadlock on
    each other's order) and read them as they are now; with ``skip_locked``, only those
    no other transaction holds (the others are left out, not waited for)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    query = _LOCK_PROFILES + " SKIP LOCKED" if skip_locked else _LOCK_PROFILES
    rows = await driver(conn, lambda db: db.fetch(query, wanted))
    return {
        pid: LockedProfile(merged_into, created_at, ProfileState(trait_state, computed))
        for pid, merged_into, created_at, trait_state, computed in rows
    }


# The identities of the profiles, and the splits between their groups as pairs of
# canonical ids (merged_into points straight at the canonical profile). Driven from
# profile_splits, which holds only what operators split: a few rows, two key lookups each.
_GROUPS_OF = """
SELECT i.type, i.value, i.profile_id, NULL::uuid FROM identities i
WHERE i.profile_id = ANY($1::uuid[])
UNION ALL
SELECT NULL, NULL, coalesce(a.merged_into, a.id), coalesce(o.merged_into, o.id)
FROM profile_splits s JOIN profiles a ON a.id = s.profile_id JOIN profiles o ON o.id = s.other_id
WHERE coalesce(a.merged_into, a.id) = ANY($1::uuid[])
  AND coalesce(o.merged_into, o.id) = ANY($1::uuid[])
"""


@dataclass(slots=True)
class Groups:
    members: dict[uuid.UUID, set[Identifier]]  # every identity of each profile
    splits: list[tuple[uuid.UUID, uuid.UUID]]  # pairs of them an operator split


async def groups_of(conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> Groups:
    """Every identity each profile holds (the per-type limits count them all) and the
    splits between them, in one statement."""
    out = Groups({pid: set() for pid in ids}, [])
    if ids:
        rows = await driver(conn, lambda db: db.fetch(_GROUPS_OF, list(ids)))
        for type_, value, pid, other in rows:
            if other is None:
                out.members[pid].add(Identifier(type_, value))
            elif pid != other:
                out.splits.append((pid, other))
    return out


_INSERT_PROFILES = """INSERT INTO profiles (id, created_at, updated_at)
SELECT id, at, at FROM unnest($1::uuid[], $2::timestamptz[]) AS p(id, at)"""


async def insert_profiles(
    conn: AsyncConnection, rows: Sequence[tuple[uuid.UUID, datetime]]
) -> None:
    """New profiles (id, created at). Like the batch's other writes, one statement on the
    driver's connection however many rows: per-row statements (an executemany) cost each
    row a statement's overhead on both sides."""
    if rows:
        params = ([pid for pid, _ in rows], [at for _, at in rows])
        await driver(conn, lambda db: db.execute(_INSERT_PROFILES, *params))


def _id_mapping(pairs: dict[uuid.UUID, uuid.UUID]) -> tuple[Subquery, dict[str, Any]]:
    """An (old, new) table of profile ids to join an UPDATE with, and its parameters."""
    mapping = (
        text("SELECT * FROM unnest(CAST(:old AS uuid[]), CAST(:new AS uuid[])) AS m(old, new)")
        .columns(old=UUID(as_uuid=True), new=UUID(as_uuid=True))
        .subquery("m")
    )
    return mapping, {"old": list(pairs), "new": list(pairs.values())}


# The merges of a batch in one statement: logged, then (m: merged-away id -> the final
# canonical one) every row pointing at a merged-away profile pointed at its canonical one.
# The parts see the same snapshot and touch different rows: a merged-away profile was
# canonical (merged_into NULL) until now, so no row is both one that ``gone`` and one
# that ``before`` updates.
_RECORD_MERGES = """
WITH m AS (SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS m(old, new)),
logged AS (
  INSERT INTO profile_merges (canonical_id, merged_id, source_id, message_id)
  SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::text[], $6::text[])
), gone AS (
  UPDATE profiles p SET merged_into = m.new, updated_at = now() FROM m WHERE p.id = m.old
), before AS (
  UPDATE profiles p SET merged_into = m.new FROM m WHERE p.merged_into = m.old
), ids AS (
  UPDATE identities t SET profile_id = m.new FROM m WHERE t.profile_id = m.old
), bought AS (
  UPDATE orders t SET profile_id = m.new FROM m WHERE t.profile_id = m.old
)
UPDATE events t SET profile_id = m.new FROM m WHERE t.profile_id = m.old
"""


async def record_merges(
    conn: AsyncConnection,
    merges: Sequence[tuple[uuid.UUID, uuid.UUID, tuple[str, str]]],
    final: Callable[[uuid.UUID], uuid.UUID],
) -> None:
    """Log each merge (canonical, merged, the event's key) as it happened, then point the
    merged-away profiles, the profiles merged into them before, their identities, events
    and orders at the final canonical profile."""
    if not merges:
        return
    head = {m: final(m) for _, m, _ in merges}
    params = (
        list(head),
        list(head.values()),
        [c for c, _, _ in merges],
        [m for _, m, _ in merges],
        [s for _, _, (s, _) in merges],
        [mid for _, _, (_, mid) in merges],
    )
    await driver(conn, lambda db: db.execute(_RECORD_MERGES, *params))


_INSERT_IDENTITIES = """INSERT INTO identities (type, value, profile_id, claimed_by)
SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[])"""


async def insert_identities(
    conn: AsyncConnection, rows: Sequence[tuple[Identifier, uuid.UUID, uuid.UUID]]
) -> None:
    """(identifier, canonical profile, the profile that claimed it). A claim racing
    another resolver's fails on the primary key (a unique violation: the batch is
    retried)."""
    if rows:
        params = (
            [i.type for i, _, _ in rows],
            [i.value for i, _, _ in rows],
            [p for _, p, _ in rows],
            [c for _, _, c in rows],
        )
        await driver(conn, lambda db: db.execute(_INSERT_IDENTITIES, *params))


@dataclass(slots=True)
class Refusal:
    """A link the identity rules refused, for ``identity_refusals``."""

    profile_id: uuid.UUID
    identifier: Identifier
    other_profile_id: uuid.UUID | None
    reason: str
    source_id: str
    message_id: str


_INSERT_REFUSALS = """INSERT INTO identity_refusals
  (profile_id, type, value, other_profile_id, reason, source_id, message_id)
SELECT * FROM unnest(
  $1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[])"""


async def insert_refusals(
    conn: AsyncConnection,
    refusals: Sequence[Refusal],
    final: Callable[[uuid.UUID], uuid.UUID],
) -> None:
    if refusals:
        params = (
            [final(r.profile_id) for r in refusals],
            [r.identifier.type for r in refusals],
            [r.identifier.value for r in refusals],
            [r.other_profile_id and final(r.other_profile_id) for r in refusals],
            [r.reason for r in refusals],
            [r.source_id for r in refusals],
            [r.message_id for r in refusals],
        )
        await driver(conn, lambda db: db.execute(_INSERT_REFUSALS, *params))


_SAVE_STATES = """UPDATE profiles p SET traits = u.traits::jsonb,
trait_state = u.trait_state::jsonb, computed = u.computed::jsonb, updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, traits, trait_state, computed)
WHERE p.id = u.id"""


@dataclass(frozen=True, slots=True)
class SavedState:
    """A profile's state as ``profiles`` stores it: its traits' view and the JSON of each
    column (made by orjson, ahead of the statement)."""

    id: uuid.UUID
    traits: str
    trait_state: str
    computed: str


def saved_state(pid: uuid.UUID, state: ProfileState) -> SavedState:
    return SavedState(
        pid,
        orjson.dumps(trait_view(state.trait_state)).decode(),
        orjson.dumps(state.trait_state).decode(),
        orjson.dumps(state.computed).decode(),
    )


async def save_states(conn: AsyncConnection, states: Sequence[SavedState]) -> None:
    """Write the profiles' states in one statement (in the order given: id order keeps
    two transactions from locking rows in opposite orders)."""
    if not states:
        return
    params = (
        [s.id for s in states],
        [s.traits for s in states],
        [s.trait_state for s in states],
        [s.computed for s in states],
    )
    await driver(conn, lambda db: db.execute(_SAVE_STATES, *params))


@dataclass(slots=True)
class EventRow:
    source_id: str
    message_id: str
    profile_id: uuid.UUID
    origin_profile_id: uuid.UUID
    type: str
    event: str | None
    channel: str
    timestamp: datetime
    received_at: datetime
    text: bytes  # the event's JSON, stored as its payload


# The columns a stored event fills, in the table's order (``id`` is the sequence's).
EVENT_COLUMNS = tuple(c.name for c in events.columns if c.name != "id")


async def insert_events(conn: AsyncConnection, rows: Sequence[EventRow]) -> None:
    await copy_records(
        conn,
        "events",
        EVENT_COLUMNS,
        [
            (
                r.source_id,
                r.message_id,
                r.profile_id,
                r.type,
                r.event,
                r.channel,
                r.timestamp,
                r.received_at,
                r.text.decode(),
                r.origin_profile_id,
            )
            for r in rows
        ],
    )


@dataclass(slots=True)
class OrderRow:
    """An order report (``resolver.orders.Fact``) of a stored event, for ``orders``."""

    source_id: str
    message_id: str
    profile_id: uuid.UUID
    origin_profile_id: uuid.UUID
    fact: Fact


async def insert_orders(conn: AsyncConnection, rows: Sequence[OrderRow]) -> None:
    await copy_records(
        conn,
        "orders",
        (
            "source_id",
            "message_id",
            "profile_id",
            "origin_profile_id",
            "kind",
            "order_id",
            "currency",
            "micros",
        ),
        [
            (
                r.source_id,
                r.message_id,
                r.profile_id,
                r.origin_profile_id,
                r.fact.kind,
                r.fact.order_id,
                r.fact.currency,
                r.fact.micros,
            )
            for r in rows
        ],
    )


# Per profile and currency: (orders, revenue net of refunds), by the rules of
# ``resolver.orders``: one value per order_id (the largest (micros, currency) report), its
# refund the largest report (NULL, a full one, above all) capped at the order, orders
# without an order_id each counted, refunds without one subtracted from their currency's
# total, never below 0. ``COLLATE "C"``: currencies compare as Python compares them.
ORDER_TOTALS = text(
    """
WITH f AS (
  SELECT profile_id, kind, order_id, currency, micros FROM orders
  WHERE profile_id = ANY(CAST(:pids AS uuid[]))
), kept AS (
  SELECT DISTINCT ON (profile_id, order_id) profile_id, order_id, currency, micros FROM f
  WHERE kind = 'order' AND order_id IS NOT NULL
  ORDER BY profile_id, order_id, micros DESC, currency COLLATE "C" DESC
), refunded AS (
  SELECT profile_id, order_id,
    CASE WHEN bool_or(micros IS NULL) THEN NULL ELSE max(micros) END AS refund
  FROM f WHERE kind = 'refund' AND order_id IS NOT NULL GROUP BY profile_id, order_id
), net AS (
  SELECT k.profile_id, k.currency, k.micros - CASE
    WHEN r.order_id IS NULL THEN 0
    WHEN r.refund IS NULL THEN k.micros
    ELSE greatest(0, least(r.refund, k.micros)) END AS micros
  FROM kept k LEFT JOIN refunded r USING (profile_id, order_id)
  UNION ALL
  SELECT profile_id, currency, micros FROM f WHERE kind = 'order' AND order_id IS NULL
), gross AS (
  SELECT profile_id, currency, count(*) AS n, sum(micros) AS micros FROM net GROUP BY 1, 2
), back AS (
  SELECT profile_id, currency, sum(micros) AS micros FROM f
  WHERE kind = 'refund' AND order_id IS NULL GROUP BY 1, 2
)
SELECT g.profile_id, g.currency, g.n::int AS n, (CASE WHEN b.micros IS NULL THEN g.micros
  ELSE greatest(0, g.micros - b.micros) END)::bigint AS micros
FROM gross g LEFT JOIN back b USING (profile_id, currency)
"""
)


async def order_totals(
    conn: AsyncConnection, pids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """The money fields (``resolver.orders.fields``) of each profile from its order rows;
    a profile without orders is absent."""
    wanted = sorted(set(pids))
    if not wanted:
        return {}
    totals: dict[uuid.UUID, list[tuple[str, int, int]]] = {}
    for r in await conn.execute(ORDER_TOTALS, {"pids": wanted}):
        totals.setdefault(r.profile_id, []).append((r.currency, r.n, r.micros))
    return {pid: fields(rows) for pid, rows in totals.items()}


# --- unmerge ---------------------------------------------------------------------------


async def group_atoms(conn: AsyncConnection, canonical: uuid.UUID) -> dict[uuid.UUID, datetime]:
    """A canonical profile's atoms (itself and every profile merged into it) with their
    creation times; the caller holds the canonical row's lock."""
    rows = await conn.execute(
        select(profiles.c.id, profiles.c.created_at).where(profiles.c.id.in_(group_ids(canonical)))
    )
    return {r.id: r.created_at for r in rows}


@dataclass(frozen=True, slots=True)
class MergeEntry:
    id: int
    canonical_id: uuid.UUID
    merged_id: uuid.UUID


async def merge_log(conn: AsyncConnection, atoms: Sequence[uuid.UUID]) -> list[MergeEntry]:
    """The merges (not undone) that built a group, oldest first."""
    rows = await conn.execute(
        select(profile_merges.c.id, profile_merges.c.canonical_id, profile_merges.c.merged_id)
        .where(profile_merges.c.merged_id.in_(atoms), profile_merges.c.undone_at.is_(None))
        .order_by(profile_merges.c.id)
    )
    return [MergeEntry(r.id, r.canonical_id, r.merged_id) for r in rows]


async def regroup(conn: AsyncConnection, head: dict[uuid.UUID, uuid.UUID]) -> None:
    """Point each atom (``head``: every atom of one group), its claimed identities and
    its first-attached events and orders at its head.

    Rows are found by profile first: every identity, event and order of the group points
    at one of its atoms (its canonical profile), and ``profile_id`` is indexed where
    ``claimed_by`` and the events' origin are not: without it an unmerge read the whole
    of ``events`` and ``identities``, holding the group's locks."""
    mapping, params = _id_mapping(head)
    atoms = list(head)
    await conn.execute(
        update(profiles)
        .where(profiles.c.id == mapping.c.old)
        .values(merged_into=func.nullif(mapping.c.new, mapping.c.old), updated_at=func.now()),
        params,
    )
    await conn.execute(
        update(identities)
        .where(identities.c.profile_id.in_(atoms), identities.c.claimed_by == mapping.c.old)
        .values(profile_id=mapping.c.new),
        params,
    )
    for table in (events, orders):
        await conn.execute(
            update(table)
            .where(table.c.profile_id.in_(atoms), table.c.origin_profile_id == mapping.c.old)
            .values(profile_id=mapping.c.new),
            params,
        )


async def event_payloads(conn: AsyncConnection, profile_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        select(events.c.payload).where(events.c.profile_id == profile_id).order_by(events.c.id)
    )
    return [r.payload for r in rows]


async def mark_undone(conn: AsyncConnection, merge_id: int) -> None:
    await conn.execute(
        update(profile_merges).where(profile_merges.c.id == merge_id).values(undone_at=func.now())
    )


async def record_split(
    conn: AsyncConnection, a: uuid.UUID, b: uuid.UUID, merge_id: int | None
) -> None:
    """Forbid merging the groups of ``a`` and ``b`` again (both ways round)."""
    await conn.execute(
        insert(profile_splits).on_conflict_do_nothing(),
        [
            {"profile_id": a, "other_id": b, "merge_id": merge_id},
            {"profile_id": b, "other_id": a, "merge_id": merge_id},
        ],
    )


async def remove_splits(conn: AsyncConnection, a: uuid.UUID, b: uuid.UUID) -> int:
    """Allow the groups of canonical profiles ``a`` and ``b`` to merge again: delete every
    split between them; how many pairs there were."""
    gone = await conn.execute(
        delete(profile_splits)
        .where(
            (
                profile_splits.c.profile_id.in_(group_ids(a))
                & profile_splits.c.other_id.in_(group_ids(b))
            )
            | (
                profile_splits.c.profile_id.in_(group_ids(b))
                & profile_splits.c.other_id.in_(group_ids(a))
            )
        )
        .returning(profile_splits.c.profile_id)
    )
    return len(gone.all()) // 2
