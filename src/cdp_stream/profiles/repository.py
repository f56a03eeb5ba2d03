"""SQL for profiles, identities and events: what the resolver writes and the API reads.

Callers own the transaction. Invariant kept by the writers: an identity always points
at a canonical profile (``merged_into IS NULL``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson
from sqlalchemy import (
    JSON,
    DateTime,
    Row,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID, insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Subquery
from sqlalchemy.types import TypeEngine

from cdp_stream.identity import Identifier
from cdp_stream.profiles.models import (
    audience_changes,
    audience_members,
    crm_contacts,
    crm_interactions,
    events,
    identities,
    identity_refusals,
    orders,
    profile_merges,
    profile_splits,
    profile_update_outbox,
    profiles,
    suppressed_identifiers,
)
from cdp_stream.profiles.sql import among
from cdp_stream.profiles.suppression import sealed_rows
from cdp_stream.resolver.orders import Fact, fields
from cdp_stream.resolver.traits import view as trait_view
from cdp_stream.sealing import SuppressionKeys

T = TypeVar("T")


def lock_key(kind: str, value: str) -> int:
    """A signed 64-bit advisory-lock key for any string."""
    digest = hashlib.blake2b(f"{kind}\x1f{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_keys(conn: AsyncConnection, keys: Iterable[int]) -> None:
    """Take transaction advisory locks in ascending order, so concurrent batches that
    touch the same identifiers queue up instead of deadlocking."""
    ordered = sorted(set(keys))
    if ordered:
        await _driver(
            conn,
            lambda db: db.execute(
                "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) k", ordered
            ),
        )


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
    rows = await _driver(conn, lambda db: db.fetch(_BATCH_READS, *params))
    out = BatchReads(set(), {}, set())
    for kind, a, b, pid in rows:
        if kind == 0:
            out.stored.add((a, b))
        elif kind == 1:
            out.owners[Identifier(a, b)] = pid
        else:
            out.suppressed.add(by_digest[a])
    return out


async def _driver(conn: AsyncConnection, call: Callable[[Any], Awaitable[T]]) -> T:
    """``call`` with the asyncpg connection under ``conn``, in its transaction: asyncpg's
    records and COPY rather than SQLAlchemy's rows (thousands per batch). SQLAlchemy
    begins the transaction at its own first statement, so one is made first if none was;
    the driver's errors are raised as SQLAlchemy's, so that ``retrying`` retries
    deadlocks and unique violations and waits out a lost connection."""
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    if not driver.is_in_transaction():
        await conn.execute(text("SELECT 1"))
    try:
        return await call(driver)
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
        raise OperationalError(None, None, exc) from exc
    except asyncpg.PostgresError as exc:
        raise DBAPIError(None, None, exc) from exc


async def profiles_of(
    conn: AsyncConnection, ids: Sequence[Identifier]
) -> dict[Identifier, uuid.UUID]:
    """The profile holding each identifier (arrays, not an IN list: one plan per batch
    size, and no per-value parameters to compile)."""
    if not ids:
        return {}
    rows = await conn.execute(
        text(
            "SELECT i.type, i.value, i.profile_id FROM identities i JOIN unnest("
            "CAST(:types AS text[]), CAST(:values AS text[])) AS k(t, v)"
            " ON i.type = k.t AND i.value = k.v"
        ),
        {"types": [i.type for i in ids], "values": [i.value for i in ids]},
    )
    return {Identifier(r.type, r.value): r.profile_id for r in rows}


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
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, LockedProfile]:
    """Row-lock the profiles in id order (concurrent resolvers queue, never deadlock on
    each other's order) and read them as they are now."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = await _driver(conn, lambda db: db.fetch(_LOCK_PROFILES, wanted))
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
        rows = await _driver(conn, lambda db: db.fetch(_GROUPS_OF, list(ids)))
        for type_, value, pid, other in rows:
            if other is None:
                out.members[pid].add(Identifier(type_, value))
            elif pid != other:
                out.splits.append((pid, other))
    return out


async def insert_profiles(
    conn: AsyncConnection, rows: Sequence[tuple[uuid.UUID, datetime]]
) -> None:
    if rows:
        await conn.execute(
            insert(profiles), [{"id": pid, "created_at": at, "updated_at": at} for pid, at in rows]
        )


def _id_mapping(pairs: dict[uuid.UUID, uuid.UUID]) -> tuple[Subquery, dict[str, Any]]:
    """An (old, new) table of profile ids to join an UPDATE with, and its parameters."""
    mapping = (
        text("SELECT * FROM unnest(CAST(:old AS uuid[]), CAST(:new AS uuid[])) AS m(old, new)")
        .columns(old=UUID(as_uuid=True), new=UUID(as_uuid=True))
        .subquery("m")
    )
    return mapping, {"old": list(pairs), "new": list(pairs.values())}


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
    await conn.execute(
        insert(profile_merges),
        [
            {"canonical_id": c, "merged_id": m, "source_id": s, "message_id": mid}
            for c, m, (s, mid) in merges
        ],
    )
    mapping, params = _id_mapping({m: final(m) for _, m, _ in merges})
    await conn.execute(
        update(profiles)
        .where(profiles.c.id == mapping.c.old)
        .values(merged_into=mapping.c.new, updated_at=func.now()),
        params,
    )
    await conn.execute(
        update(profiles)
        .where(profiles.c.merged_into == mapping.c.old)
        .values(merged_into=mapping.c.new),
        params,
    )
    for table in (identities, events, orders):
        await conn.execute(
            update(table)
            .where(table.c.profile_id == mapping.c.old)
            .values(profile_id=mapping.c.new),
            params,
        )


async def insert_identities(
    conn: AsyncConnection, rows: Sequence[tuple[Identifier, uuid.UUID, uuid.UUID]]
) -> None:
    """(identifier, canonical profile, the profile that claimed it)."""
    if rows:
        await conn.execute(
            insert(identities),
            [
                {"type": i.type, "value": i.value, "profile_id": p, "claimed_by": c}
                for i, p, c in rows
            ],
        )


@dataclass(slots=True)
class Refusal:
    """A link the identity rules refused, for ``identity_refusals``."""

    profile_id: uuid.UUID
    identifier: Identifier
    other_profile_id: uuid.UUID | None
    reason: str
    source_id: str
    message_id: str


async def insert_refusals(
    conn: AsyncConnection,
    refusals: Sequence[Refusal],
    final: Callable[[uuid.UUID], uuid.UUID],
) -> None:
    if refusals:
        await conn.execute(
            insert(identity_refusals),
            [
                {
                    "profile_id": final(r.profile_id),
                    "type": r.identifier.type,
                    "value": r.identifier.value,
                    "other_profile_id": r.other_profile_id and final(r.other_profile_id),
                    "reason": r.reason,
                    "source_id": r.source_id,
                    "message_id": r.message_id,
                }
                for r in refusals
            ],
        )


_SAVE_STATES = """UPDATE profiles p SET traits = u.traits::jsonb,
trait_state = u.trait_state::jsonb, computed = u.computed::jsonb, updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, traits, trait_state, computed)
WHERE p.id = u.id"""


async def save_states(conn: AsyncConnection, states: dict[uuid.UUID, ProfileState]) -> None:
    """Write the profiles' states in one statement (JSON made by orjson, here)."""
    if not states:
        return
    columns: dict[str, list[str]] = {"traits": [], "trait_state": [], "computed": []}
    for s in states.values():
        columns["traits"].append(orjson.dumps(trait_view(s.trait_state)).decode())
        columns["trait_state"].append(orjson.dumps(s.trait_state).decode())
        columns["computed"].append(orjson.dumps(s.computed).decode())
    await _driver(conn, lambda db: db.execute(_SAVE_STATES, list(states), *columns.values()))


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


async def _copy(
    conn: AsyncConnection, table: str, columns: Sequence[str], records: list[tuple[Any, ...]]
) -> None:
    """COPY ``records`` into ``table`` in the caller's transaction: one round trip and no
    per-row statement, several times faster than a multi-row INSERT."""
    if records:
        await _driver(
            conn, lambda db: db.copy_records_to_table(table, records=records, columns=columns)
        )


async def insert_events(conn: AsyncConnection, rows: Sequence[EventRow]) -> None:
    await _copy(
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
    await _copy(
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


@dataclass(frozen=True, slots=True)
class Update:
    """A profile update for the outbox: its key and JSON object, and the events (source,
    message) the relay adds to it as ``"events": [...]``; None: the payload is whole."""

    key: str
    payload: bytes
    events: Sequence[tuple[str, str]] | None = None


async def insert_outbox(conn: AsyncConnection, updates: Sequence[Update]) -> None:
    """Profile updates to relay to ``cdp.profile-updates`` once this transaction commits."""
    await _copy(
        conn,
        "profile_update_outbox",
        ("key", "payload", "event_sources", "event_messages"),
        [
            (
                u.key,
                u.payload,
                None if u.events is None else [s for s, _ in u.events],
                None if u.events is None else [m for _, m in u.events],
            )
            for u in updates
        ],
    )


_TAKE = text(
    """
WITH taken AS (
  DELETE FROM profile_update_outbox WHERE id IN (
    SELECT id FROM profile_update_outbox ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)
  RETURNING id, key, payload, event_sources, event_messages
)
SELECT t.id, t.key, t.payload, t.event_sources IS NOT NULL AS spliced, (
  SELECT string_agg(e.payload::text, ',' ORDER BY k.n)
  FROM unnest(t.event_sources, t.event_messages) WITH ORDINALITY AS k(s, m, n)
  JOIN events e ON e.source_id = k.s AND e.message_id = k.m
) AS events
FROM taken t ORDER BY t.id
"""
)


async def take_outbox(conn: AsyncConnection, limit: int) -> list[tuple[str, bytes]]:
    """Delete and return up to ``limit`` pending updates (key, JSON), oldest first, their
    events read from ``events`` (an event erased since is left out); rows another
    transaction is relaying are skipped. They come back if the caller rolls back."""
    out = []
    for r in await conn.execute(_TAKE, {"n": limit}):
        payload: bytes = r.payload
        if r.spliced:
            events = (r.events or "").encode()
            payload = payload[:-1] + b',"events":[' + events + b"]}"
        out.append((r.key, payload))
    return out


async def vacuum_outbox(conn: AsyncConnection) -> bool:
    """VACUUM the outbox (``conn`` in autocommit) unless another process is doing it;
    whether it ran. Its rows live for milliseconds, so dead ones pile up much faster than
    autovacuum (a pass a minute at best) reclaims them."""
    key = lock_key("vacuum", "profile_update_outbox")
    if not await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
        return False
    try:
        # not TRUNCATE: waiting for the exclusive lock that giving pages back needs would
        # hold up this resolver while the others insert; the pages freed are reused
        await conn.execute(text("VACUUM (TRUNCATE false) profile_update_outbox"))
    finally:
        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    return True


# --- unmerge ---------------------------------------------------------------------------


def _atoms(canonical: uuid.UUID) -> Any:
    """The ids of a canonical profile and of every profile merged into it."""
    return select(profiles.c.id).where(
        (profiles.c.id == canonical) | (profiles.c.merged_into == canonical)
    )


async def group_atoms(conn: AsyncConnection, canonical: uuid.UUID) -> dict[uuid.UUID, datetime]:
    """A canonical profile's atoms (itself and every profile merged into it) with their
    creation times; the caller holds the canonical row's lock."""
    rows = await conn.execute(
        select(profiles.c.id, profiles.c.created_at).where(profiles.c.id.in_(_atoms(canonical)))
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
    """Point each atom, its claimed identities and its first-attached events and orders
    at its head."""
    mapping, params = _id_mapping(head)
    await conn.execute(
        update(profiles)
        .where(profiles.c.id == mapping.c.old)
        .values(merged_into=func.nullif(mapping.c.new, mapping.c.old), updated_at=func.now()),
        params,
    )
    await conn.execute(
        update(identities)
        .where(identities.c.claimed_by == mapping.c.old)
        .values(profile_id=mapping.c.new),
        params,
    )
    for table in (events, orders):
        await conn.execute(
            update(table)
            .where(table.c.origin_profile_id == mapping.c.old)
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
            (profile_splits.c.profile_id.in_(_atoms(a)) & profile_splits.c.other_id.in_(_atoms(b)))
            | (
                profile_splits.c.profile_id.in_(_atoms(b))
                & profile_splits.c.other_id.in_(_atoms(a))
            )
        )
        .returning(profile_splits.c.profile_id)
    )
    return len(gone.all()) // 2


# --- deletion ----------------------------------------------------------------------------


async def delete_group(
    conn: AsyncConnection, canonical: uuid.UUID, suppression: SuppressionKeys
) -> list[uuid.UUID]:
    """Erase a person: the canonical profile and every profile merged into it, with their
    identities (remembered sealed in the suppression list), events, merges, refusals,
    pending updates, CRM contact and interactions, audience membership. Returns the ids."""
    await conn.execute(select(profiles.c.id).where(profiles.c.id == canonical).with_for_update())
    ids = list((await conn.execute(_atoms(canonical))).scalars())
    held = await conn.execute(
        select(identities.c.type, identities.c.value).where(identities.c.profile_id.in_(ids))
    )
    digests = sealed_rows(suppression, [(r.type, r.value) for r in held])
    if digests:
        await conn.execute(insert(suppressed_identifiers).on_conflict_do_nothing(), digests)
    keys = [str(i) for i in ids]
    await conn.execute(
        update(identity_refusals)
        .where(identity_refusals.c.other_profile_id.in_(ids))
        .values(other_profile_id=None)
    )
    for table, column in (
        (identities, identities.c.profile_id),
        (events, events.c.profile_id),
        (orders, orders.c.profile_id),
        (identity_refusals, identity_refusals.c.profile_id),
        (crm_contacts, crm_contacts.c.profile_id),
        (crm_interactions, crm_interactions.c.profile_id),
        (audience_members, audience_members.c.profile_id),
        (audience_changes, audience_changes.c.profile_id),
    ):
        await conn.execute(delete(table).where(column.in_(ids)))
    await conn.execute(delete(profile_update_outbox).where(profile_update_outbox.c.key.in_(keys)))
    await conn.execute(
        delete(profile_merges).where(
            profile_merges.c.canonical_id.in_(ids) | profile_merges.c.merged_id.in_(ids)
        )
    )
    await conn.execute(update(profiles).where(profiles.c.id.in_(ids)).values(merged_into=None))
    await conn.execute(delete(profiles).where(profiles.c.id.in_(ids)))
    return ids


# --- reads, for the API ---------------------------------------------------------------


async def canonical_id(conn: AsyncConnection, profile_id: uuid.UUID) -> uuid.UUID | None:
    """Follow ``merged_into`` to the canonical profile; None if the id is unknown."""
    return (await canonical_ids(conn, {profile_id})).get(profile_id)


async def canonical_ids(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """Each id's canonical profile (itself when canonical), for many at once; an unknown
    or deleted id is absent (so is one caught in a cycle, which no merge writes)."""
    out: dict[uuid.UUID, uuid.UUID] = {}
    pending = {i: i for i in ids}
    for _ in range(16):  # merges point straight at the canonical profile: 1-2 rounds
        if not pending:
            break
        rows = await conn.execute(
            select(profiles.c.id, profiles.c.merged_into).where(
                among(profiles.c.id, set(pending.values()))
            )
        )
        parent = {r.id: r.merged_into for r in rows}
        following: dict[uuid.UUID, uuid.UUID] = {}
        for origin, current in pending.items():
            if current not in parent:
                continue
            if parent[current] is None:
                out[origin] = current
            else:
                following[origin] = parent[current]
        pending = following
    return out


async def profile_for_identifier(conn: AsyncConnection, ident: Identifier) -> uuid.UUID | None:
    return (await profiles_of(conn, [ident])).get(ident)


# A profile as the API shows it, in one statement (one round trip): the row, its identities
# and the ids merged into it, aggregated by Postgres.
_PROFILE = """SELECT p.id, p.traits, p.computed, p.created_at, p.updated_at,
  (SELECT json_agg(json_build_object('type', i.type, 'value', i.value)
                   ORDER BY i.type, i.value)
     FROM identities i WHERE i.profile_id = p.id) AS identities,
  (SELECT json_agg(m.id ORDER BY m.id) FROM profiles m WHERE m.merged_into = p.id) AS merged_from
FROM profiles p"""
_PROFILE_COLUMNS: dict[str, TypeEngine[Any] | type[TypeEngine[Any]]] = {
    "id": UUID(as_uuid=True),
    "traits": JSONB,
    "computed": JSONB,
    "created_at": DateTime(timezone=True),
    "updated_at": DateTime(timezone=True),
    "identities": JSON,
    "merged_from": JSON,
}
_PROFILE_BY_ID = text(_PROFILE + " WHERE p.id = :id").columns(**_PROFILE_COLUMNS)
# Identities always point at a canonical profile: no merged_into to follow.
_PROFILE_BY_IDENTIFIER = text(
    _PROFILE + " JOIN identities x ON x.profile_id = p.id WHERE x.type = :type AND x.value = :value"
).columns(**_PROFILE_COLUMNS)


def _profile(row: Row[Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "id": str(row.id),
        "identities": row.identities or [],
        "traits": row.traits,
        "computed": row.computed,
        "merged_from": row.merged_from or [],
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


async def read_profile(conn: AsyncConnection, profile_id: uuid.UUID) -> dict[str, Any] | None:
    """The profile ``profile_id`` (as it is: merged-away ones are not followed)."""
    return _profile((await conn.execute(_PROFILE_BY_ID, {"id": profile_id})).one_or_none())


async def read_profile_of(conn: AsyncConnection, ident: Identifier) -> dict[str, Any] | None:
    """The profile that holds ``ident``, or None."""
    params = {"type": ident.type, "value": ident.value}
    return _profile((await conn.execute(_PROFILE_BY_IDENTIFIER, params)).one_or_none())


@dataclass(frozen=True, slots=True)
class TimelineRow:
    id: int
    timestamp: datetime
    item: dict[str, Any]


async def read_events(
    conn: AsyncConnection,
    profile_id: uuid.UUID,
    *,
    limit: int,
    before: tuple[datetime, int] | None,
    type_: str | None,
    channel: str | None,
    since: datetime | None,
) -> list[TimelineRow]:
    """A page of the timeline, newest first: (timestamp, id) below ``before``."""
    query = select(events).where(events.c.profile_id == profile_id)
    if before is not None:
        query = query.where(tuple_(events.c.timestamp, events.c.id) < tuple_(*before))
    if type_ is not None:
        query = query.where(events.c.type == type_)
    if channel is not None:
        query = query.where(events.c.channel == channel)
    if since is not None:
        query = query.where(events.c.timestamp >= since)
    rows = await conn.execute(
        query.order_by(events.c.timestamp.desc(), events.c.id.desc()).limit(limit)
    )
    fields = ("message_id", "source_id", "type", "event", "channel", "timestamp", "received_at")
    return [
        TimelineRow(r.id, r.timestamp, {**{f: r._mapping[f] for f in fields}, "payload": r.payload})
        for r in rows
    ]


async def read_identities(conn: AsyncConnection, profile_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        select(identities.c.type, identities.c.value, identities.c.created_at)
        .where(identities.c.profile_id == profile_id)
        .order_by(identities.c.type, identities.c.value)
    )
    return [dict(r._mapping) for r in rows]


async def read_merges(conn: AsyncConnection, profile_id: uuid.UUID) -> dict[str, Any]:
    """The merge log of a profile's group, the links refused for it, and the splits that
    keep it apart from other profiles (each with the canonical profile holding it now)."""
    atoms = _atoms(profile_id)
    merges = await conn.execute(
        select(profile_merges)
        .where(
            profile_merges.c.merged_id.in_(atoms) | (profile_merges.c.canonical_id == profile_id)
        )
        .order_by(profile_merges.c.id)
    )
    refusals = await conn.execute(
        select(identity_refusals)
        .where(identity_refusals.c.profile_id == profile_id)
        .order_by(identity_refusals.c.id)
    )
    other = profiles.alias("o")
    splits = await conn.execute(
        select(
            profile_splits.c.profile_id,
            profile_splits.c.other_id,
            func.coalesce(other.c.merged_into, other.c.id).label("other_canonical_id"),
            profile_splits.c.merge_id,
            profile_splits.c.created_at,
        )
        .join(other, other.c.id == profile_splits.c.other_id)
        .where(profile_splits.c.profile_id.in_(atoms))
        .order_by(profile_splits.c.created_at, profile_splits.c.other_id)
    )
    return {
        "merges": [
            {**r._mapping, "canonical_id": str(r.canonical_id), "merged_id": str(r.merged_id)}
            for r in merges
        ],
        "splits": [
            {
                **r._mapping,
                "profile_id": str(r.profile_id),
                "other_id": str(r.other_id),
                "other_canonical_id": str(r.other_canonical_id),
            }
            for r in splits
        ],
        "refusals": [
            {**r._mapping, "other_profile_id": r.other_profile_id and str(r.other_profile_id)}
            for r in refusals
        ],
    }


async def outbox_depth(conn: AsyncConnection, cap: int = 1_000_000) -> int:
    """Profile updates waiting in the outbox, counted up to ``cap`` (so a count of a
    backlog stays cheap): ``cdp_profile_updates_outbox_rows``."""
    query = text("SELECT count(*) FROM (SELECT 1 FROM profile_update_outbox LIMIT :cap) o")
    return int((await conn.execute(query, {"cap": cap})).scalar_one())


# --- reads, for the console ------------------------------------------------------------


async def read_trait_sources(conn: AsyncConnection, profile_id: uuid.UUID) -> list[dict[str, Any]]:
    """Each trait the profile shows, with when it was last set (the timestamp of the event
    that set it, as ``trait_state`` keeps it) and the source of that event: the profile's
    event at that timestamp that carries the trait (its timeline index finds them)."""
    state = (
        await conn.execute(select(profiles.c.trait_state).where(profiles.c.id == profile_id))
    ).scalar_one_or_none() or {}
    shown: dict[str, tuple[str, Any, bool]] = {
        name: (ts, value, True) for name, (ts, value) in state.get("once", {}).items()
    }
    shown.update({name: (ts, value, False) for name, (ts, value) in state.get("set", {}).items()})
    stamps = {ts: datetime.fromisoformat(ts.replace("Z", "+00:00")) for ts, _, _ in shown.values()}
    rows = await conn.execute(
        select(events.c.timestamp, events.c.source_id, events.c.payload).where(
            events.c.profile_id == profile_id, events.c.timestamp.in_(set(stamps.values()))
        )
    )
    carried: dict[tuple[datetime, str], str] = {}
    for row in rows:
        context = row.payload.get("context") or {}
        names = {
            *(row.payload.get("traits") or {}),
            *(context.get("traits") or {}),
            *(context.get("traits_set_once") or {}),
        }
        for name in names:
            carried.setdefault((row.timestamp, name), row.source_id)
    return [
        {
            "name": name,
            "value": value,
            "set_at": stamps[ts],
            "set_once": once,
            "source_id": carried.get((stamps[ts], name)),
        }
        for name, (ts, value, once) in sorted(shown.items())
    ]


async def read_identity_graph(conn: AsyncConnection, profile_id: uuid.UUID) -> dict[str, Any]:
    """The canonical profile's group as a graph: each profile merged into it (and itself)
    with the identifiers it first claimed, the merges that joined them, the refused links."""
    members = await conn.execute(
        select(profiles.c.id, profiles.c.created_at)
        .where((profiles.c.id == profile_id) | (profiles.c.merged_into == profile_id))
        .order_by(profiles.c.created_at, profiles.c.id)
    )
    claimed = await conn.execute(
        select(
            identities.c.type, identities.c.value, identities.c.claimed_by, identities.c.created_at
        )
        .where(identities.c.profile_id == profile_id)
        .order_by(identities.c.type, identities.c.value)
    )
    by_atom: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for r in claimed:
        by_atom.setdefault(r.claimed_by, []).append(
            {"type": r.type, "value": r.value, "created_at": r.created_at}
        )
    atoms = [
        {"id": str(r.id), "created_at": r.created_at, "identities": by_atom.pop(r.id, [])}
        for r in members
    ]
    # Identifiers claimed by a profile no longer in the group (an unmerge moved it away
    # and an event brought the identifier back) are shown on the canonical one.
    atoms[0]["identities"] += [i for rest in by_atom.values() for i in rest]
    return {"canonical_id": str(profile_id), "atoms": atoms, **await read_merges(conn, profile_id)}


async def search_identifiers(
    conn: AsyncConnection, type_: str, prefix: str, limit: int
) -> list[dict[str, Any]]:
    """Identifiers of ``type_`` starting with ``prefix`` (the type-ahead), in value order:
    a range scan of the identities primary key, so it costs ``limit`` rows, not a scan."""
    rows = await conn.execute(
        select(identities.c.type, identities.c.value, identities.c.profile_id)
        .where(
            identities.c.type == type_,
            identities.c.value >= prefix,
            identities.c.value < prefix + "\U0010ffff",
            func.starts_with(identities.c.value, prefix),
        )
        .order_by(identities.c.value)
        .limit(limit)
    )
    return [{**r._mapping, "profile_id": str(r.profile_id)} for r in rows]


async def events_received_since(conn: AsyncConnection, since: datetime) -> int:
    """Events stored whose collector received them at or after ``since``."""
    count: int = (
        await conn.execute(select(func.count()).where(events.c.received_at >= since))
    ).scalar_one()
    return count


async def latest_consent(conn: AsyncConnection, profile_id: uuid.UUID) -> dict[str, Any] | None:
    """``context.consent`` of the profile's latest event carrying one, with its time."""
    consent = events.c.payload[("context", "consent")]
    row = (
        await conn.execute(
            select(consent.label("consent"), events.c.timestamp)
            .where(events.c.profile_id == profile_id, consent.is_not(None))
            .order_by(events.c.timestamp.desc(), events.c.id.desc())
            .limit(1)
        )
    ).one_or_none()
    return None if row is None else {"consent": row.consent, "at": row.timestamp}
