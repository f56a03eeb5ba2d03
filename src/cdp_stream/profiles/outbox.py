"""The profile-update outbox: updates written in the transaction that made them, relayed
to ``cdp.profile-updates`` after it commits (by the resolvers, or by the request that
queued them), so a crash between the commit and the publish loses nothing.

Two ways out: a resolver publishes the updates its batch wrote from memory once the batch
commits and then deletes those rows by id (``spliced``, ``delete_outbox``); whatever that
leaves (a crash, a broker away, a request's updates) is taken from the table by
``take_outbox``, its events read back from ``events``. Shared by the resolver (a batch's
updates) and the API (an unmerge's, an erasure's tombstone), so it sits below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.repository import copy_records, lock_key

_COLUMNS = ("key", "payload", "event_sources", "event_messages")


@dataclass(frozen=True, slots=True)
class Update:
    """A profile update for the outbox: its key and JSON object, and the events (source,
    message) the relay adds to it as ``"events": [...]``; None: the payload is whole.
    ``texts``: those events' JSON, when the writer has them (a resolver's batch), for
    publishing the update from memory."""

    key: str
    payload: bytes
    events: Sequence[tuple[str, str]] | None = None
    texts: Sequence[bytes] = ()

    def record(self) -> bytes:
        """The record as relayed, its events spliced in from ``texts``."""
        if self.events is None:
            return self.payload
        return spliced(self.payload, b",".join(self.texts))


def spliced(payload: bytes, events: bytes) -> bytes:
    """An update's JSON object with ``"events": [<events>]`` added (``events``: the events'
    JSON objects, comma-separated)."""
    return payload[:-1] + b',"events":[' + events + b"]}"


# The sequence named as a constant: ``nextval(pg_get_serial_sequence(..))`` looked it up
# again for every row (14 ms against 1.6 ms of Postgres for a 4,000-update batch).
_IDS = text("SELECT nextval('profile_update_outbox_id_seq'::regclass) FROM generate_series(1, :n)")


async def insert_outbox(conn: AsyncConnection, updates: Sequence[Update]) -> list[int]:
    """Profile updates to relay to ``cdp.profile-updates`` once this transaction commits;
    their ids, in order (taken from the sequence first: ``COPY`` returns none). A
    resolver publishes its batch's from memory; a request (an unmerge's updates, an
    erasure's tombstone) publishes its own by id (``take_outbox(ids=...)``); every other
    row is left to the resolvers."""
    if not updates:
        return []
    ids = list((await conn.execute(_IDS, {"n": len(updates)})).scalars())
    rows = [(i, *row) for i, row in zip(ids, _rows(updates), strict=True)]
    await copy_records(conn, "profile_update_outbox", ("id", *_COLUMNS), rows)
    return ids


def _rows(updates: Sequence[Update]) -> list[tuple[Any, ...]]:
    return [
        (
            u.key,
            u.payload,
            None if u.events is None else [s for s, _ in u.events],
            None if u.events is None else [m for _, m in u.events],
        )
        for u in updates
    ]


# The rows to relay: all (a resolver's relay) or those of ``ids`` (a request's own).
# ``picked`` is materialized: as ``DELETE .. WHERE id IN (SELECT .. LIMIT)`` the planner
# may rescan the subquery (a nested loop) and take more than ``:n`` rows.
_TAKE = """
WITH picked AS MATERIALIZED (
  SELECT id FROM profile_update_outbox {where} ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED
), taken AS (
  DELETE FROM profile_update_outbox o USING picked WHERE o.id = picked.id
  RETURNING o.id, o.key, o.payload, o.event_sources, o.event_messages
)
SELECT t.id, t.key, t.payload, t.event_sources IS NOT NULL AS spliced, (
  SELECT string_agg(e.payload::text, ',' ORDER BY k.n)
  FROM unnest(t.event_sources, t.event_messages) WITH ORDINALITY AS k(s, m, n)
  JOIN events e ON e.source_id = k.s AND e.message_id = k.m
) AS events
FROM taken t ORDER BY t.id
"""
_TAKE_ALL = text(_TAKE.format(where=""))
_TAKE_IDS = text(_TAKE.format(where="WHERE id = ANY(CAST(:ids AS bigint[]))"))
_TAKE_OLD = text(_TAKE.format(where="WHERE created_at < now() - make_interval(secs => :age)"))


async def take_outbox(
    conn: AsyncConnection,
    limit: int,
    ids: Sequence[int] | None = None,
    older_than_s: float | None = None,
) -> list[tuple[str, bytes]]:
    """Delete and return up to ``limit`` pending updates (key, JSON), oldest first, their
    events read from ``events`` (an event erased since is left out); rows another
    transaction is relaying are skipped. They come back if the caller rolls back. With
    ``ids``, only those rows (the ones a request queued); with ``older_than_s``, only rows
    written that long ago (left behind, not being published from memory)."""
    if ids is not None:
        taken = await conn.execute(_TAKE_IDS, {"n": limit, "ids": list(ids)})
    elif older_than_s is not None:
        taken = await conn.execute(_TAKE_OLD, {"n": limit, "age": older_than_s})
    else:
        taken = await conn.execute(_TAKE_ALL, {"n": limit})
    out = []
    for r in taken:
        payload: bytes = r.payload
        if r.spliced:
            payload = spliced(payload, (r.events or "").encode())
        out.append((r.key, payload))
    return out


async def delete_outbox(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Forget rows published from memory (a row a ``take_outbox`` took meanwhile is gone
    already: it was published twice, which the topic's consumers allow)."""
    await conn.execute(
        text("DELETE FROM profile_update_outbox WHERE id = ANY(CAST(:ids AS bigint[]))"),
        {"ids": list(ids)},
    )


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


async def outbox_depth(conn: AsyncConnection, cap: int = 1_000_000) -> int:
    """Profile updates waiting in the outbox, counted up to ``cap`` (so a count of a
    backlog stays cheap): ``cdp_profile_updates_outbox_rows``."""
    query = text("SELECT count(*) FROM (SELECT 1 FROM profile_update_outbox LIMIT :cap) o")
    return int((await conn.execute(query, {"cap": cap})).scalar_one())
