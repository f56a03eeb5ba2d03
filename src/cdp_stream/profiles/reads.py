"""The API's reads of profiles: a profile as the API shows it, its timeline, identities,
merges and splits, traits with their sources, identity graph, consent, and the
identifier type-ahead. Read-only; each answer in as few statements as it takes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.identity import Identifier
from cdp_stream.profiles.models import (
    events,
    identities,
    identity_refusals,
    profile_merges,
    profile_splits,
    profiles,
)
from cdp_stream.profiles.repository import fetch_row, group_ids

_PROFILE = """SELECT p.id, p.traits, p.computed, p.created_at, p.updated_at,
  (SELECT json_agg(json_build_object('type', i.type, 'value', i.value)
                   ORDER BY i.type, i.value)
     FROM identities i WHERE i.profile_id = p.id) AS identities,
  (SELECT json_agg(m.id ORDER BY m.id) FROM profiles m WHERE m.merged_into = p.id) AS merged_from
FROM profiles p"""
_PROFILE_BY_ID = _PROFILE + " WHERE p.id = $1"
# Identities always point at a canonical profile: no merged_into to follow.
_PROFILE_BY_IDENTIFIER = (
    _PROFILE + " JOIN identities x ON x.profile_id = p.id WHERE x.type = $1 AND x.value = $2"
)


@dataclass(frozen=True, slots=True)
class ProfileRow:
    """A profile as the API shows it (its fields in the order of the JSON)."""

    id: str
    identities: list[dict[str, str]]  # {"type", "value"}, in that order
    traits: dict[str, Any]
    computed: dict[str, Any]
    merged_from: list[str]
    created_at: datetime
    updated_at: datetime


def _profile(row: asyncpg.Record | None) -> ProfileRow | None:
    if row is None:
        return None
    return ProfileRow(
        str(row["id"]),
        row["identities"] or [],
        row["traits"],
        row["computed"],
        row["merged_from"] or [],
        row["created_at"],
        row["updated_at"],
    )


async def read_profile(conn: AsyncConnection, profile_id: uuid.UUID) -> ProfileRow | None:
    """The profile ``profile_id`` (as it is: merged-away ones are not followed)."""
    return _profile(await fetch_row(conn, _PROFILE_BY_ID, profile_id))


async def read_profile_of(conn: AsyncConnection, ident: Identifier) -> ProfileRow | None:
    """The profile that holds ``ident``, or None: the API's lookups, read by asyncpg."""
    return _profile(await fetch_row(conn, _PROFILE_BY_IDENTIFIER, ident.type, ident.value))


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


@dataclass(frozen=True, slots=True)
class IdentityRow:
    type: str
    value: str
    created_at: datetime


async def read_identities(conn: AsyncConnection, profile_id: uuid.UUID) -> list[IdentityRow]:
    rows = await conn.execute(
        select(identities.c.type, identities.c.value, identities.c.created_at)
        .where(identities.c.profile_id == profile_id)
        .order_by(identities.c.type, identities.c.value)
    )
    return [IdentityRow(r.type, r.value, r.created_at) for r in rows]


@dataclass(frozen=True, slots=True)
class MergeRow:
    id: int
    canonical_id: str
    merged_id: str
    source_id: str | None
    message_id: str | None
    created_at: datetime
    undone_at: datetime | None


@dataclass(frozen=True, slots=True)
class RefusalRow:
    type: str
    value: str
    other_profile_id: str | None
    reason: str
    source_id: str
    message_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SplitRow:
    profile_id: str
    other_id: str
    other_canonical_id: str
    merge_id: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Merges:
    merges: list[MergeRow]
    refusals: list[RefusalRow]
    splits: list[SplitRow]


async def read_merges(conn: AsyncConnection, profile_id: uuid.UUID) -> Merges:
    """The merge log of a profile's group, the links refused for it, and the splits that
    keep it apart from other profiles (each with the canonical profile holding it now)."""
    atoms = group_ids(profile_id)
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
    return Merges(
        [
            MergeRow(
                r.id,
                str(r.canonical_id),
                str(r.merged_id),
                r.source_id,
                r.message_id,
                r.created_at,
                r.undone_at,
            )
            for r in merges
        ],
        [
            RefusalRow(
                r.type,
                r.value,
                r.other_profile_id and str(r.other_profile_id),
                r.reason,
                r.source_id,
                r.message_id,
                r.created_at,
            )
            for r in refusals
        ],
        [
            SplitRow(
                str(r.profile_id),
                str(r.other_id),
                str(r.other_canonical_id),
                r.merge_id,
                r.created_at,
            )
            for r in splits
        ],
    )


@dataclass(frozen=True, slots=True)
class TraitSource:
    name: str
    value: Any
    set_at: datetime  # the timestamp of the event that set it
    set_once: bool  # from context.traits_set_once: the oldest value wins
    source_id: str | None  # the source of that event (None: not found)


async def read_trait_sources(conn: AsyncConnection, profile_id: uuid.UUID) -> list[TraitSource]:
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
        TraitSource(name, value, stamps[ts], once, carried.get((stamps[ts], name)))
        for name, (ts, value, once) in sorted(shown.items())
    ]


@dataclass(frozen=True, slots=True)
class Atom:
    id: str  # a profile of the group (the canonical one first)
    created_at: datetime
    identities: list[IdentityRow]  # the identifiers it claimed first


@dataclass(frozen=True, slots=True)
class Graph:
    canonical_id: str
    atoms: list[Atom]
    merges: list[MergeRow]
    refusals: list[RefusalRow]
    splits: list[SplitRow]


async def read_identity_graph(conn: AsyncConnection, profile_id: uuid.UUID) -> Graph:
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
    by_atom: dict[uuid.UUID, list[IdentityRow]] = {}
    for r in claimed:
        by_atom.setdefault(r.claimed_by, []).append(IdentityRow(r.type, r.value, r.created_at))
    atoms = [Atom(str(r.id), r.created_at, by_atom.pop(r.id, [])) for r in members]
    # Identifiers claimed by a profile no longer in the group (an unmerge moved it away
    # and an event brought the identifier back) are shown on the canonical one.
    atoms[0].identities.extend(i for rest in by_atom.values() for i in rest)
    log = await read_merges(conn, profile_id)
    return Graph(str(profile_id), atoms, log.merges, log.refusals, log.splits)


@dataclass(frozen=True, slots=True)
class IdentifierMatch:
    type: str
    value: str
    profile_id: str


async def search_identifiers(
    conn: AsyncConnection, type_: str, prefix: str, limit: int
) -> list[IdentifierMatch]:
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
    return [IdentifierMatch(r.type, r.value, str(r.profile_id)) for r in rows]


async def events_received_since(conn: AsyncConnection, since: datetime) -> int:
    """Events stored whose collector received them at or after ``since``."""
    count: int = (
        await conn.execute(select(func.count()).where(events.c.received_at >= since))
    ).scalar_one()
    return count


class Consent(NamedTuple):
    consent: Any  # ``context.consent`` as the event carried it
    at: datetime  # the event's timestamp


async def latest_consent(conn: AsyncConnection, profile_id: uuid.UUID) -> Consent | None:
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
    return None if row is None else Consent(row.consent, row.timestamp)
