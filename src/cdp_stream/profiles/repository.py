"""SQL for profiles, identities and events: what the resolver writes and the API reads.

Callers own the transaction. Invariant kept by the writers: an identity always points
at a canonical profile (``merged_into IS NULL``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import events, identities, profiles
from cdp_stream.resolver.identity import Identifier


def lock_key(kind: str, value: str) -> int:
    """A signed 64-bit advisory-lock key for any string."""
    digest = hashlib.blake2b(f"{kind}\x1f{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_keys(conn: AsyncConnection, keys: Iterable[int]) -> None:
    """Take transaction advisory locks in ascending order, so concurrent batches that
    touch the same identifiers queue up instead of deadlocking."""
    ordered = sorted(set(keys))
    if ordered:
        await conn.execute(
            text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) k"),
            {"keys": ordered},
        )


async def stored_message_ids(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which (source_id, message_id) pairs are already stored."""
    if not keys:
        return set()
    rows = await conn.execute(
        select(events.c.source_id, events.c.message_id).where(
            tuple_(events.c.source_id, events.c.message_id).in_(list(keys))
        )
    )
    return {(r.source_id, r.message_id) for r in rows}


async def profiles_of(
    conn: AsyncConnection, ids: Sequence[Identifier]
) -> dict[Identifier, uuid.UUID]:
    if not ids:
        return {}
    rows = await conn.execute(
        select(identities.c.type, identities.c.value, identities.c.profile_id).where(
            tuple_(identities.c.type, identities.c.value).in_([(i.type, i.value) for i in ids])
        )
    )
    return {Identifier(r.type, r.value): r.profile_id for r in rows}


@dataclass
class ProfileState:
    traits: dict[str, Any]
    trait_ts: dict[str, str]
    computed: dict[str, Any]


async def load_states(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, ProfileState]:
    wanted = list(set(ids))
    if not wanted:
        return {}
    rows = await conn.execute(
        select(profiles.c.id, profiles.c.traits, profiles.c.trait_ts, profiles.c.computed)
        .where(profiles.c.id.in_(wanted))
        .order_by(profiles.c.id)
        .with_for_update()
    )
    return {r.id: ProfileState(r.traits, r.trait_ts, r.computed) for r in rows}


async def insert_profiles(conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> None:
    if ids:
        await conn.execute(insert(profiles), [{"id": i} for i in ids])


async def insert_identities(
    conn: AsyncConnection, rows: Sequence[tuple[Identifier, uuid.UUID]]
) -> None:
    if rows:
        await conn.execute(
            insert(identities),
            [{"type": i.type, "value": i.value, "profile_id": p} for i, p in rows],
        )


async def save_states(conn: AsyncConnection, states: dict[uuid.UUID, ProfileState]) -> None:
    if not states:
        return
    stmt = (
        update(profiles)
        .where(profiles.c.id == bindparam("pid"))
        .values(
            traits=bindparam("traits"),
            trait_ts=bindparam("trait_ts"),
            computed=bindparam("computed"),
            updated_at=func.now(),
        )
    )
    await conn.execute(
        stmt,
        [
            {"pid": pid, "traits": s.traits, "trait_ts": s.trait_ts, "computed": s.computed}
            for pid, s in states.items()
        ],
    )


@dataclass(frozen=True)
class EventRow:
    source_id: str
    message_id: str
    profile_id: uuid.UUID
    type: str
    event: str | None
    channel: str
    timestamp: datetime
    received_at: datetime
    payload: dict[str, Any]


async def insert_events(conn: AsyncConnection, rows: Sequence[EventRow]) -> None:
    if rows:
        await conn.execute(insert(events), [r.__dict__ for r in rows])


# --- reads, for the API ---------------------------------------------------------------


async def canonical_id(conn: AsyncConnection, profile_id: uuid.UUID) -> uuid.UUID | None:
    """Follow ``merged_into`` to the canonical profile; None if the id is unknown."""
    current: uuid.UUID | None = profile_id
    seen: set[uuid.UUID] = set()
    while current is not None and current not in seen:
        seen.add(current)
        row = (
            await conn.execute(select(profiles.c.merged_into).where(profiles.c.id == current))
        ).one_or_none()
        if row is None:
            return None
        if row.merged_into is None:
            return current
        current = row.merged_into
    return None


async def profile_for_identifier(conn: AsyncConnection, ident: Identifier) -> uuid.UUID | None:
    return (await profiles_of(conn, [ident])).get(ident)


async def read_profile(conn: AsyncConnection, profile_id: uuid.UUID) -> dict[str, Any] | None:
    row = (await conn.execute(select(profiles).where(profiles.c.id == profile_id))).one_or_none()
    if row is None:
        return None
    ids = await conn.execute(
        select(identities.c.type, identities.c.value)
        .where(identities.c.profile_id == profile_id)
        .order_by(identities.c.type, identities.c.value)
    )
    return {
        "id": str(row.id),
        "identities": [{"type": r.type, "value": r.value} for r in ids],
        "traits": row.traits,
        "computed": row.computed,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
