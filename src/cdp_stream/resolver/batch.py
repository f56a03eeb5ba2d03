"""Apply one micro-batch of events to Postgres inside the caller's transaction.

The steps, in the order they must run:

1. lock   - advisory locks on every identifier and message id in the batch, in ascending
            key order: concurrent resolvers serialize on shared identifiers, and cannot
            both store one redelivered message.
2. dedupe - drop events already stored (a redelivery) and repeats inside the batch;
            only after the lock is the "already stored?" answer final.
3. load   - the profiles owning the batch's identifiers, row-locked in id order, with all
            their identities. If an identity moved between reading and locking (another
            resolver merged, an operator unmerged) :class:`StaleRead` makes the caller
            retry the batch; once the rows are locked nothing can move them.
   An event carrying an identifier of a deleted person is set aside (suppressed).
4. place  - each event, in order, by the rules in :mod:`cdp_stream.resolver`: claims,
            merges and refused links, in memory (:class:`_Graph`).
5. fold   - traits and computed traits of the event into its profile's state.
6. write  - new profiles, merges (identities and events move to the canonical profile),
            claims, refusals, events, states and one outbox row per stored event.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import RetryTransaction
from cdp_stream.profiles.repository import EventRow, ProfileState, Refusal
from cdp_stream.resolver import computed, traits
from cdp_stream.resolver.identity import Identifier, IdentityRules


class StaleRead(RetryTransaction):
    """A profile changed under us between reading and locking it: retry the batch."""


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    unidentified: list[dict[str, Any]] = field(default_factory=list)
    suppressed: list[dict[str, Any]] = field(default_factory=list)  # a deleted person's
    merges: int = 0
    refusals: int = 0


def event_time(value: str) -> tuple[datetime, str]:
    """The event time as a datetime and as a fixed-width UTC string that sorts correctly."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    return dt, dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Graph:
    """Identifiers, profiles and merges of one batch, in memory until written."""

    rules: IdentityRules
    owner: dict[Identifier, uuid.UUID]
    members: dict[uuid.UUID, set[Identifier]]
    states: dict[uuid.UUID, ProfileState]
    created: dict[uuid.UUID, datetime]
    redirect: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    new_profiles: list[uuid.UUID] = field(default_factory=list)
    claims: list[tuple[Identifier, uuid.UUID]] = field(default_factory=list)
    merges: list[tuple[uuid.UUID, uuid.UUID, tuple[str, str]]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    def find(self, pid: uuid.UUID) -> uuid.UUID:
        while pid in self.redirect:
            pid = self.redirect[pid]
        return pid

    def owner_of(self, ident: Identifier) -> uuid.UUID | None:
        pid = self.owner.get(ident)
        return None if pid is None else self.find(pid)

    def exceeded(self, current: set[Identifier], added: set[Identifier]) -> str | None:
        """The first type whose limit the union would break, or None if it fits."""
        for type_ in sorted({i.type for i in added}):
            count = sum(1 for i in current | added if i.type == type_)
            if count > self.rules.limit(type_):
                return type_
        return None

    def new_profile(self, now: datetime) -> uuid.UUID:
        pid = uuid.uuid4()
        self.new_profiles.append(pid)
        self.members[pid] = set()
        self.states[pid] = ProfileState({}, {})
        self.created[pid] = now
        return pid

    def claim(self, ident: Identifier, pid: uuid.UUID) -> None:
        self.owner[ident] = pid
        self.members[pid].add(ident)
        self.claims.append((ident, pid))

    def merge(self, a: uuid.UUID, b: uuid.UUID, key: tuple[str, str]) -> uuid.UUID:
        """Merge two canonical profiles into the older one; returns it."""
        canonical, merged = sorted((a, b), key=lambda p: (self.created[p], p.bytes))
        self.redirect[merged] = canonical
        for ident in self.members.pop(merged):
            self.owner[ident] = canonical
            self.members[canonical].add(ident)
        gone, kept = self.states.pop(merged), self.states[canonical]
        self.states[canonical] = ProfileState(
            traits.merge(kept.trait_state, gone.trait_state),
            computed.merge(kept.computed, gone.computed),
        )
        self.merges.append((canonical, merged, key))
        return canonical

    def place(self, ids: Sequence[Identifier], key: tuple[str, str], now: datetime) -> uuid.UUID:
        """The canonical profile of one event, applying its claims, merges and refusals.

        Unowned identifiers are claimed at the end, by the profile the event ends on (its
        origin too): an unmerge then keeps an identifier with the event that brought it.
        """
        group: uuid.UUID | None = None
        pending: list[Identifier] = []
        refused: list[tuple[Identifier, uuid.UUID | None, str]] = []
        for ident in ids:
            other = self.owner_of(ident)
            if other is not None and other == group:
                continue
            current = (self.members[group] if group else set()) | set(pending)
            broken = self.exceeded(current, self.members[other] if other else {ident})
            if broken is not None:
                refused.append((ident, other, broken))
            elif other is None:
                pending.append(ident)
            elif group is None:
                group = other
            else:
                group = self.merge(group, other, key)
        if group is None:
            group = self.new_profile(now)
        for ident in pending:
            self.claim(ident, group)
        for ident, other, broken in refused:
            limit = self.rules.limit(broken)
            reason = f"a profile may hold at most {limit} {broken} value(s)"
            self.refusals.append(Refusal(group, ident, other, reason, *key))
        return group


async def apply_batch(
    conn: AsyncConnection, events: Sequence[dict[str, Any]], rules: IdentityRules
) -> BatchResult:
    result = BatchResult()
    ids_by_event = [rules.identifiers_of(e) for e in events]
    keys = [(e["sourceId"], e["messageId"]) for e in events]

    await repo.lock_keys(
        conn,
        [repo.lock_key(i.type, i.value) for ids in ids_by_event for i in ids]
        + [repo.lock_key("message", f"{s}\x1f{m}") for s, m in keys],
    )
    seen = await repo.stored_message_ids(conn, keys)
    owner = await repo.profiles_of(conn, sorted({i for ids in ids_by_event for i in ids}))
    loaded = await repo.lock_profiles(conn, set(owner.values()))
    if owner != await repo.profiles_of(conn, sorted(owner)):  # now that the rows are ours
        raise StaleRead("identities moved (a merge or unmerge) while the batch was locking")
    gone = await repo.suppressed(
        conn, sorted({i for ids in ids_by_event for i in ids}), rules.suppression
    )
    graph = _Graph(
        rules,
        owner,
        await repo.identities_of(conn, list(loaded)),
        {pid: p.state for pid, p in loaded.items()},
        {pid: p.created_at for pid, p in loaded.items()},
    )

    now = datetime.now(UTC)
    rows: list[EventRow] = []
    updates: list[tuple[int, uuid.UUID, list[uuid.UUID], dict[str, Any], dict[str, Any]]] = []
    for event, ids, key in zip(events, ids_by_event, keys, strict=True):
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        if not ids:
            result.unidentified.append(event)
            continue
        if gone.intersection(ids):
            result.suppressed.append(event)
            continue
        merges_before = len(graph.merges)
        before_states = {pid: graph.states[pid] for pid in {graph.owner_of(i) for i in ids} if pid}
        home = graph.place(ids, key, now)
        dt, ts = event_time(event["timestamp"])
        state = graph.states[home]
        shown_before = traits.view(before_states.get(home, state).trait_state)
        computed_before = before_states.get(home, state).computed
        state = ProfileState(
            traits.merge(state.trait_state, traits.of_event(event, ts)),
            computed.merge(state.computed, computed.of_event(event, ts)),
        )
        graph.states[home] = state
        merged_now = [m for _, m, _ in graph.merges[merges_before:]]
        changed_traits = traits.changes(shown_before, traits.view(state.trait_state))
        changed_computed = {k: v for k, v in state.computed.items() if computed_before.get(k) != v}
        updates.append((len(rows), home, merged_now, changed_traits, changed_computed))
        rows.append(
            EventRow(
                source_id=key[0],
                message_id=key[1],
                profile_id=home,
                origin_profile_id=home,
                type=event["type"],
                event=event.get("event") or event.get("name"),
                channel=event.get("channel", "other"),
                timestamp=dt,
                received_at=event_time(event["receivedAt"])[0],
                payload=event,
            )
        )

    final = graph.find
    await repo.insert_profiles(conn, [(pid, graph.created[pid]) for pid in graph.new_profiles])
    await repo.record_merges(conn, graph.merges, final)
    await repo.insert_identities(conn, [(i, final(p), p) for i, p in graph.claims])
    await repo.insert_refusals(conn, graph.refusals, final)
    for row in rows:
        row.profile_id = final(row.profile_id)
    await repo.insert_events(conn, rows)
    touched = {final(r.profile_id) for r in rows} | {final(c) for c, _, _ in graph.merges}
    await repo.save_states(conn, {pid: graph.states[pid] for pid in sorted(touched)})
    await repo.insert_outbox(
        conn,
        [
            {
                "profile_id": str(final(home)),
                "merged_ids": [str(m) for m in merged],
                "changed_traits": changed_traits,
                "changed_computed": changed_computed,
                "event": rows[index].payload,
            }
            for index, home, merged, changed_traits, changed_computed in updates
        ],
    )
    result.stored = len(rows)
    result.merges = len(graph.merges)
    result.refusals = len(graph.refusals)
    return result
