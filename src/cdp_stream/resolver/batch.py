"""Apply one micro-batch of events to Postgres inside the caller's transaction.

The steps, in the order they must run:

0. prepare - before the transaction, what each event alone gives: identifiers, times,
            its traits, computed traits and order report, its JSON (:func:`prepare`).
1. lock   - advisory locks on every identifier in the batch, in ascending key order:
            concurrent resolvers serialize on shared identifiers. Or, not waiting (what
            the consumer asks first), only the free ones: an event with an identifier
            another transaction holds is held back for a later batch.
2. dedupe - drop events already stored (a redelivery) and repeats inside the batch. Two
            resolvers storing one message at once (only around a rebalance: a message
            keeps its partition) meet on the events' unique key: the later one's
            transaction fails with a unique violation and is retried, and dedupes.
3. load   - the profiles owning the batch's identifiers, row-locked in id order, with all
            their identities and the splits between their groups. If an identity moved
            between reading and locking (another resolver merged, an operator unmerged,
            a person was erased: the identities read after the lock no longer hold it)
            :class:`StaleRead` makes the caller retry the batch; once the rows are
            locked nothing can move them. Not waiting, rows another transaction holds
            are skipped (``SKIP LOCKED``) and their events held back, and so are the
            events of identifiers that moved: a retry would redo the whole batch (with
            three resolvers, one batch in eight) for the few events of the people
            another batch just merged.
   An event carrying an identifier of a deleted person is set aside (suppressed).
   The dedupe, the owners and the suppressed identifiers are one statement (after the
   locks: a claim committed while we waited is seen), the row locks and the identities
   one each: four round trips before the writes.
4. place  - each event, in order, by the rules in :mod:`cdp_stream.resolver`: claims,
            merges and refused links (limits, splits), in memory (:class:`_Graph`).
5. fold   - once per profile, after placing every event: the prepared traits and
            computed traits of its events into its state (the merges are
            order-independent, so folding a profile's events together equals folding
            them one by one, at a fraction of the copying).
6. write  - new profiles, merges (identities, events and orders move to the canonical
            profile), claims, refusals, order reports (COPY) and the money totals of the
            profiles that got orders or merges, while Python folds (step 5); the events
            (COPY), while Python makes the states' JSON and one profile update per
            profile (:func:`updates`); then the states and the updates. Python and
            Postgres each work while the other does (``profiles.db.beside``): one
            resolver spent a fifth of a backlog's time waiting for one or the other.

Why every identifier is locked, and not only those whose owner may change (new claims):
correctness does not rest on the advisory locks (the row locks, the unique key of
``identities``: a racing claim fails and the batch is retried, and :class:`StaleRead` give
it); they save those retries. A batch must hold the row lock of every profile it folds
events into from reading its state to writing it, so two batches with a person in
common cannot both go on. Waiting made them run one after the other, whole: two
2,000-event batches of a backlog nearly always share someone, even among 12,000 people,
and three resolvers caught up no faster than one (``benchmarks/resolve.py``). Holding
back only the events of the people another batch holds lets them run side by side; the
order of a person's events does not matter (the merges and folds are
order-independent), and the consumer runtime commits no offset past an event held back
(:mod:`cdp_stream.consuming`), and applies it waiting once it has been held back a few
times, so it is not held back for ever.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream import metrics
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import outbox
from cdp_stream.profiles import repository as shared
from cdp_stream.profiles.db import RetryTransaction, beside
from cdp_stream.profiles.outbox import Update
from cdp_stream.resolver import computed, orders, traits
from cdp_stream.resolver import repository as repo
from cdp_stream.resolver.repository import (
    EventRow,
    LockedProfile,
    OrderRow,
    ProfileState,
    Refusal,
)
from cdp_stream.timestamps import event_time
from cdp_stream.updates import updated_payload


class StaleRead(RetryTransaction):
    """A profile changed under us between reading and locking it: retry the batch."""

    cause = "stale_read"


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    unidentified: list[dict[str, Any]] = field(default_factory=list)
    suppressed: list[dict[str, Any]] = field(default_factory=list)  # a deleted person's
    merges: int = 0
    refusals: int = 0
    held: list[Prepared] = field(default_factory=list)  # for a later batch (not waiting)
    # the profile updates written to the outbox, by row id: to publish once committed
    updates: dict[int, Update] = field(default_factory=dict)


# Why a link between two groups an operator split is refused (``repo.record_split``).
SPLIT_REASON = "split by an operator (DELETE /v1/profiles/{ref}/splits/{other} allows the link)"

# A profile update carries its events up to this many bytes of them (the rest go in more
# updates; Postgres's text of an event is a little longer than its JSON here): far under
# Kafka's default 1 MiB message limit whatever a batch holds.
UPDATE_EVENTS_BYTES = 256 * 1024


@dataclass
class _Graph:
    """Identifiers, profiles and merges of one batch, in memory until written."""

    rules: IdentityRules
    owner: dict[Identifier, uuid.UUID]
    members: dict[uuid.UUID, set[Identifier]]
    states: dict[uuid.UUID, ProfileState]
    created: dict[uuid.UUID, datetime]
    splits: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)
    redirect: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    new_profiles: list[uuid.UUID] = field(default_factory=list)
    claims: list[tuple[Identifier, uuid.UUID]] = field(default_factory=list)
    merges: list[tuple[uuid.UUID, uuid.UUID, tuple[str, str]]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    # by profile, the first type its identities alone exceed: the question of an event's
    # first identifier a profile owns, asked again for every event of its person
    over: dict[uuid.UUID, str | None] = field(default_factory=dict)

    def find(self, pid: uuid.UUID) -> uuid.UUID:
        while pid in self.redirect:
            pid = self.redirect[pid]
        return pid

    def owner_of(self, ident: Identifier) -> uuid.UUID | None:
        pid = self.owner.get(ident)
        return None if pid is None else self.find(pid)

    def exceeded(self, current: set[Identifier], added: set[Identifier]) -> str | None:
        """The first type whose limit the union would break, or None if it fits."""
        counts: dict[str, int] = {}
        for type_, _ in current.union(added) if current else added:
            counts[type_] = counts.get(type_, 0) + 1
        for type_ in sorted({i.type for i in added}):
            if counts[type_] > self.rules.limit(type_):
                return type_
        return None

    def split(self, a: uuid.UUID, b: uuid.UUID) -> bool:
        """Whether an operator split the groups of canonical profiles ``a`` and ``b``."""
        return any({self.find(x), self.find(y)} == {a, b} for x, y in self.splits)

    def refusal(
        self,
        group: uuid.UUID | None,
        other: uuid.UUID | None,
        current: set[Identifier],
        ident: Identifier,
    ) -> str | None:
        """Why the group may not take ``ident`` (with ``other``'s profile), or None."""
        if group is not None and other is not None and self.split(group, other):
            return SPLIT_REASON
        if other is not None and not current:
            if other not in self.over:
                self.over[other] = self.exceeded(current, self.members[other])
            broken = self.over[other]
        else:
            broken = self.exceeded(current, self.members[other] if other else {ident})
        if broken is None:
            return None
        return f"a profile may hold at most {self.rules.limit(broken)} {broken} value(s)"

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
        self.over.pop(pid, None)
        self.claims.append((ident, pid))

    def merge(self, a: uuid.UUID, b: uuid.UUID, key: tuple[str, str]) -> uuid.UUID:
        """Merge two canonical profiles into the older one; returns it."""
        canonical, merged = sorted((a, b), key=lambda p: (self.created[p], p.bytes))
        self.redirect[merged] = canonical
        self.over.pop(canonical, None)
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
            current = self.members[group] if group else set()
            if pending:
                current = current.union(pending)
            reason = self.refusal(group, other, current, ident)
            if reason is not None:
                refused.append((ident, other, reason))
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
        for ident, other, reason in refused:
            self.refusals.append(Refusal(group, ident, other, reason, *key))
        return group


@dataclass(slots=True)
class Prepared:
    """An event with all that the batch needs of it that depends on it alone, worked out
    before the transaction: the locks are held for the rest only (and a retried batch
    does not do it again)."""

    event: dict[str, Any]
    key: tuple[str, str]  # (sourceId, messageId)
    ids: list[Identifier]
    timestamp: datetime
    ts: str  # the timestamp as a fixed-width UTC string
    received_at: datetime
    text: bytes  # the event's JSON
    trait_part: traits.TraitState
    computed_part: dict[str, Any]
    fact: orders.Fact | None


def prepare(
    events: Sequence[dict[str, Any]],
    rules: IdentityRules,
    texts: Sequence[bytes] | None = None,
) -> list[Prepared]:
    """``texts``: the events' JSON as received (their records' values), stored as they
    are: what the collector wrote is what orjson would write again (2-3 µs an event)."""
    out = []
    for n, event in enumerate(events):
        timestamp, ts = event_time(event["timestamp"])
        out.append(
            Prepared(
                event,
                (event["sourceId"], event["messageId"]),
                rules.identifiers_of(event),
                timestamp,
                ts,
                event_time(event["receivedAt"])[0],
                orjson.dumps(event) if texts is None else texts[n],
                traits.of_event(event, ts),
                computed.of_event(event, ts),
                orders.fact_of(event),
            )
        )
    return out


def _hold_back(
    batch: Sequence[Prepared], taken: set[Identifier], result: BatchResult
) -> list[Prepared]:
    """The batch less its events with an identifier in ``taken``: those are held back."""
    result.held += [p for p in batch if taken.intersection(p.ids)]
    return [p for p in batch if taken.isdisjoint(p.ids)]


async def apply_batch(
    conn: AsyncConnection, events: Sequence[dict[str, Any]], rules: IdentityRules
) -> BatchResult:
    return await apply_prepared(conn, prepare(events, rules), rules)


async def apply_prepared(
    conn: AsyncConnection, batch: Sequence[Prepared], rules: IdentityRules, wait: bool = True
) -> BatchResult:
    """The batch's steps (see the module docstring). With ``wait`` False it waits for no
    other transaction: an event with an identifier or a profile another one holds is held
    back (``BatchResult.held``) for a later batch, and the rest is applied."""
    result = BatchResult()
    every_id = sorted({i for p in batch for i in p.ids})
    keys = {i: shared.lock_key(i.type, i.value) for i in every_id}

    started = time.perf_counter()
    if wait:
        await shared.lock_keys(conn, keys.values())
    else:
        busy = await shared.try_lock_keys(conn, keys.values())
        if busy:
            batch = _hold_back(batch, {i for i, k in keys.items() if k in busy}, result)
            every_id = sorted({i for p in batch for i in p.ids})
    metrics.lock_wait.labels("identifiers").observe(time.perf_counter() - started)
    read = await repo.batch_reads(conn, [p.key for p in batch], every_id, rules.suppression)
    seen, owner, gone = read.stored, read.owners, read.suppressed
    started = time.perf_counter()
    owners = set(owner.values())
    loaded = await repo.lock_profiles(conn, owners, skip_locked=not wait)
    if len(loaded) < len(owners):  # others hold these rows (not waiting)
        batch = _hold_back(batch, {i for i, pid in owner.items() if pid not in loaded}, result)
        owner = {i: pid for i, pid in owner.items() if pid in loaded}
    metrics.lock_wait.labels("profiles").observe(time.perf_counter() - started)
    held = await repo.groups_of(conn, list(loaded))  # now that the rows are ours
    members = held.members
    moved = {ident for ident, pid in owner.items() if ident not in members[pid]}
    if moved and wait:
        raise StaleRead("identities moved (a merge or unmerge) while the batch was locking")
    if moved:  # their events wait for a later batch, which reads the owners anew
        batch = _hold_back(batch, moved, result)
        owner = {i: pid for i, pid in owner.items() if i not in moved}
    graph = _Graph(
        rules,
        owner,
        members,
        {pid: p.state for pid, p in loaded.items()},
        {pid: p.created_at for pid, p in loaded.items()},
        held.splits,
    )

    now = datetime.now(UTC)
    placed: list[tuple[Prepared, uuid.UUID]] = []
    for p in batch:
        if p.key in seen:
            result.duplicates += 1
            continue
        seen.add(p.key)
        if not p.ids:
            result.unidentified.append(p.event)
        elif gone.intersection(p.ids):
            result.suppressed.append(p.event)
        else:
            placed.append((p, graph.place(p.ids, p.key, now)))

    final = graph.find
    order_rows = [
        OrderRow(*p.key, final(home), home, p.fact) for p, home in placed if p.fact is not None
    ]
    recount = {r.profile_id for r in order_rows} | {final(c) for c, _, _ in graph.merges}
    # Postgres writes the graph while Python folds the profiles' states, and stores the
    # events while Python makes the updates: each waits less for the other.
    totals, (rows, by_profile, states) = await beside(
        _write_graph(conn, graph, order_rows, recount), _fold(graph, placed)
    )
    for pid in recount:
        values = {k: v for k, v in states[pid].computed.items() if k not in computed.ORDER_FIELDS}
        states[pid] = ProfileState(states[pid].trait_state, values | totals.get(pid, {}))
    _, (saved, written) = await beside(
        repo.insert_events(conn, rows), _outputs(graph, loaded, states, by_profile)
    )
    await repo.save_states(conn, saved)
    ids = await outbox.insert_outbox(conn, written)
    result.updates = dict(zip(ids, written, strict=True))
    result.stored = len(rows)
    result.merges = len(graph.merges)
    result.refusals = len(graph.refusals)
    return result


# Profiles (or events) worked on between two yields to the loop while a statement of the
# same batch runs: about a millisecond of Python, the most its answer waits for it.
_CHUNK = 200


async def _write_graph(
    conn: AsyncConnection, graph: _Graph, order_rows: Sequence[OrderRow], recount: set[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """The batch's new profiles, merges, claims, refusals and order reports; the money
    totals of ``recount`` (the profiles that got orders or merges) once they are in."""
    final = graph.find
    await repo.insert_profiles(conn, [(pid, graph.created[pid]) for pid in graph.new_profiles])
    await repo.record_merges(conn, graph.merges, final)
    await repo.insert_identities(conn, [(i, final(p), p) for i, p in graph.claims])
    await repo.insert_refusals(conn, graph.refusals, final)
    await repo.insert_orders(conn, order_rows)
    return await repo.order_totals(conn, recount)


async def _fold(
    graph: _Graph, placed: Sequence[tuple[Prepared, uuid.UUID]]
) -> tuple[list[EventRow], dict[uuid.UUID, list[EventRow]], dict[uuid.UUID, ProfileState]]:
    """The events' rows (by profile too) and the state of every profile the batch
    touched: copied once, its events' traits and computed traits folded into the copy."""
    final = graph.find
    rows: list[EventRow] = []
    by_profile: dict[uuid.UUID, list[EventRow]] = {}
    states: dict[uuid.UUID, ProfileState] = {}
    for n, (p, home) in enumerate(placed):
        if n % _CHUNK == _CHUNK - 1:
            await asyncio.sleep(0)
        event = p.event
        row = EventRow(
            source_id=p.key[0],
            message_id=p.key[1],
            profile_id=final(home),
            origin_profile_id=home,
            type=event["type"],
            event=event.get("event") or event.get("name"),
            channel=event.get("channel", "other"),
            timestamp=p.timestamp,
            received_at=p.received_at,
            text=p.text,
        )
        rows.append(row)
        pid = row.profile_id
        if pid not in states:  # its state copied once; its events fold into the copy
            state = graph.states[pid]
            states[pid] = ProfileState(traits.merge(state.trait_state, {}), dict(state.computed))
            by_profile[pid] = []
        by_profile[pid].append(row)
        traits.fold(states[pid].trait_state, p.trait_part)
        computed.fold(states[pid].computed, p.computed_part)
    for canonical, _, _ in graph.merges:  # merged without events of their own here
        pid = final(canonical)
        states.setdefault(pid, graph.states[pid])
    return rows, by_profile, states


async def _outputs(
    graph: _Graph,
    loaded: dict[uuid.UUID, LockedProfile],
    states: dict[uuid.UUID, ProfileState],
    by_profile: dict[uuid.UUID, list[EventRow]],
) -> tuple[list[repo.SavedState], list[Update]]:
    """The profiles' states as saved (in id order) and their profile updates."""
    merged_into: dict[uuid.UUID, list[uuid.UUID]] = {}
    for _, merged, _ in graph.merges:
        merged_into.setdefault(graph.find(merged), []).append(merged)
    saved: list[repo.SavedState] = []
    written: list[Update] = []
    for n, pid in enumerate(sorted(states)):
        if n % _CHUNK == _CHUNK - 1:
            await asyncio.sleep(0)
        state = states[pid]
        saved.append(repo.saved_state(pid, state))
        before = loaded[pid].state if pid in loaded else ProfileState({}, {})
        written += updates(pid, merged_into.get(pid, []), before, state, by_profile.get(pid, []))
    return saved, written


def updates(
    pid: uuid.UUID,
    merged: Sequence[uuid.UUID],
    before: ProfileState,
    after: ProfileState,
    events: Sequence[EventRow],
    split_from: uuid.UUID | None = None,
) -> list[Update]:
    """The profile updates of one profile for one batch: what changed over the batch, the
    profiles merged into it, and its events (named, with their JSON, for the relay to
    add), at most :data:`UPDATE_EVENTS_BYTES` of them per update (so an update stays small
    however busy the profile is); a profile merged without events of its own gets one
    without any.

    (a :class:`cdp_stream.updates.ProfileUpdate`); from an unmerge, ``split_from`` names
    the other profile of the two it made (whose events and identities may have been this
    one's a moment ago)."""
    payload = updated_payload(
        str(pid),
        [str(m) for m in merged],
        traits.changed(before.trait_state, after.trait_state),
        {k: v for k, v in after.computed.items() if before.computed.get(k) != v},
        None if split_from is None else str(split_from),
    )
    chunks: list[list[EventRow]] = [[]]
    size = 0
    for row in events:
        if chunks[-1] and size + len(row.text) > UPDATE_EVENTS_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += len(row.text) + 1
    return [
        Update(
            str(pid),
            payload,
            [(r.source_id, r.message_id) for r in chunk],
            [r.text for r in chunk],
        )
        for chunk in chunks
    ]
