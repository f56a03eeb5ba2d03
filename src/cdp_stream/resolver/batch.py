"""Apply one micro-batch of events to Postgres inside the caller's transaction.

The steps, in the order they must run:

1. lock   - advisory locks on every identifier and message id in the batch, in ascending
            key order: concurrent resolvers serialize on shared people, never deadlock
            on each other's batches, and cannot both store one redelivered message.
2. dedupe - drop events already stored (a redelivery) and repeats inside the batch;
            only after the lock is the "already stored?" answer final.
3. place  - each event's home profile: the profile of its highest-priority known
            identifier, else a new profile; unknown identifiers are claimed by it.
4. fold   - traits (newest timestamp wins) and computed traits (commutative).
5. write  - new profiles, identities, events and profile states, set-wise.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.repository import EventRow, ProfileState
from cdp_stream.resolver.computed import fold_event
from cdp_stream.resolver.identity import Identifier, identifiers_of
from cdp_stream.resolver.traits import merge_traits


@dataclass
class ProfileChange:
    """What one stored event changed, for ``cdp.profile-updates``."""

    profile_id: uuid.UUID
    changed_traits: dict[str, Any]
    event: dict[str, Any]


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    changes: list[ProfileChange] = field(default_factory=list)


def _ts(value: str) -> tuple[datetime, str]:
    """The event time as a datetime and as a fixed-width UTC string that sorts correctly."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    return dt, dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _traits_of(event: dict[str, Any]) -> dict[str, Any]:
    traits: dict[str, Any] = dict((event.get("context") or {}).get("traits") or {})
    if event.get("type") in ("identify", "group") or event.get("traits"):
        traits.update(event.get("traits") or {})
    return traits


async def apply_batch(conn: AsyncConnection, events: Sequence[dict[str, Any]]) -> BatchResult:
    result = BatchResult()
    ids_by_event = [identifiers_of(e) for e in events]
    keys = [(e["sourceId"], e["messageId"]) for e in events]

    await repo.lock_keys(
        conn,
        [repo.lock_key(i.type, i.value) for ids in ids_by_event for i in ids]
        + [repo.lock_key("message", f"{s}\x1f{m}") for s, m in keys],
    )

    seen = await repo.stored_message_ids(conn, keys)
    owners = await repo.profiles_of(conn, sorted({i for ids in ids_by_event for i in ids}))
    states = await repo.load_states(conn, owners.values())
    new_profiles: list[uuid.UUID] = []
    claims: list[tuple[Identifier, uuid.UUID]] = []
    rows: list[EventRow] = []
    touched: set[uuid.UUID] = set()

    for event, ids, key in zip(events, ids_by_event, keys, strict=True):
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        home = next((owners[i] for i in ids if i in owners), None)
        if home is None:
            home = uuid.uuid4()
            new_profiles.append(home)
            states[home] = ProfileState({}, {}, {})
        for ident in ids:
            if ident not in owners:
                owners[ident] = home
                claims.append((ident, home))
        dt, ts = _ts(event["timestamp"])
        state = states[home]
        changed = merge_traits(state.traits, state.trait_ts, _traits_of(event), ts)
        fold_event(state.computed, event, ts)
        touched.add(home)
        rows.append(
            EventRow(
                source_id=key[0],
                message_id=key[1],
                profile_id=home,
                type=event["type"],
                event=event.get("event") or event.get("name"),
                channel=event.get("channel", "other"),
                timestamp=dt,
                received_at=_ts(event["receivedAt"])[0],
                payload=event,
            )
        )
        result.changes.append(ProfileChange(home, changed, event))

    await repo.insert_profiles(conn, new_profiles)
    await repo.insert_identities(conn, claims)
    await repo.insert_events(conn, rows)
    await repo.save_states(conn, {pid: states[pid] for pid in sorted(touched)})
    result.stored = len(rows)
    return result
