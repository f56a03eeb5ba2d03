"""Undo the last merge of a profile by replaying its merge log without that merge.

Every identity remembers the profile that first claimed it and every event the profile it
first attached to (the *atoms*). A canonical profile is the union of its atoms along the
merge log; dropping the last merge from that log and taking the connected components
again gives the profiles as they would be had the merge never happened. Each component's
canonical profile is its oldest atom, as for a merge, and its traits and computed traits
are folded again from its events (both folds are order-independent), its money fields
summed again from its order rows, which regroup with the events.

The canonical profile's row is locked first, so resolvers touching it wait, and see the
moved identities when they get the lock (``batch.StaleRead``).

An unmerge sticks: it records a split between the two profiles it makes
(``repo.record_split``), and the resolver refuses a later event's link between their
groups (logged as a refusal, like a per-type limit) until the split is removed
(``repo.remove_splits``, ``DELETE /v1/profiles/{ref}/splits/{other}``).

Both profiles get a profile update in the outbox, in the same transaction, so the CRM and
audiences follow as they follow a batch (the caller publishes those rows, by the ids
``Unmerged.outbox_ids`` gives, after the commit): each names the other as
``split_from``, and ``changed_*`` are relative to the merged profile.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.outbox import insert_outbox
from cdp_stream.resolver import computed, traits
from cdp_stream.resolver import repository as repo
from cdp_stream.resolver.batch import updates
from cdp_stream.resolver.repository import ProfileState
from cdp_stream.timestamps import event_time


@dataclass(frozen=True)
class Unmerged:
    merge_id: int
    kept: uuid.UUID
    restored: uuid.UUID
    outbox_ids: list[int]  # the two profile updates, for the caller to publish


async def unmerge_last(conn: AsyncConnection, canonical: uuid.UUID) -> Unmerged | None:
    """Reverse the newest merge into ``canonical``; None when it has none left."""
    locked = await repo.lock_profiles(conn, [canonical])
    if canonical not in locked:  # erased meanwhile
        return None
    merged = locked[canonical].state
    atoms = await repo.group_atoms(conn, canonical)
    log = await repo.merge_log(conn, list(atoms))
    if not log:
        return None
    last = log[-1]
    parent = {a: a for a in atoms}

    def find(a: uuid.UUID) -> uuid.UUID:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for entry in log[:-1]:
        parent[find(entry.merged_id)] = find(entry.canonical_id)
    components: dict[uuid.UUID, list[uuid.UUID]] = {}
    for atom in atoms:
        components.setdefault(find(atom), []).append(atom)
    head = {}
    for members in components.values():
        oldest = min(members, key=lambda a: (atoms[a], a.bytes))
        head.update(dict.fromkeys(members, oldest))

    await repo.regroup(conn, head)
    heads = set(head.values())
    money = await repo.order_totals(conn, heads)
    states = {}
    for profile_id in heads:
        trait_state: traits.TraitState = {"set": {}, "once": {}}
        values: dict[str, Any] = {}
        for payload in await repo.event_payloads(conn, profile_id):
            ts = event_time(payload["timestamp"])[1]
            traits.fold(trait_state, traits.of_event(payload, ts))
            computed.fold(values, computed.of_event(payload, ts))
        states[profile_id] = ProfileState(trait_state, values | money.get(profile_id, {}))
    await repo.save_states(conn, [repo.saved_state(pid, states[pid]) for pid in sorted(states)])
    await repo.mark_undone(conn, last.id)
    kept, restored = head[last.canonical_id], head[last.merged_id]
    await repo.record_split(conn, kept, restored, last.id)
    queued = await insert_outbox(
        conn,
        [
            update
            for pid, other in ((kept, restored), (restored, kept))
            for update in updates(pid, [], merged, states[pid], [], split_from=other)
        ],
    )
    return Unmerged(last.id, kept, restored, queued)
