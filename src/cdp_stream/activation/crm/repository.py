"""The CRM feed's persistence: ``crm_contacts``, ``crm_interactions`` and the webhook
queue ``crm_webhook_deliveries``, and the profile reads a contact is derived from. SQLAlchemy
Core, and asyncpg itself for the two reads of a whole batch's people; every function runs
in the caller's transaction (the feed's, or the webhook's own short ones). What to write is
decided in ``feed.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Interval, Text, cast, delete, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import UUID, Insert, insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from cdp_stream.activation.crm.contacts import CONTACT_FIELDS, IDENTITY_TYPES
from cdp_stream.activation.crm.interactions import LEAD_KINDS
from cdp_stream.profiles.erasure import delete_activation_rows
from cdp_stream.profiles.models import (
    crm_contacts,
    crm_interactions,
    crm_webhook_deliveries,
    events,
)
from cdp_stream.profiles.repository import driver
from cdp_stream.profiles.sql import among, name_key_of, unnested

Held = dict[uuid.UUID, dict[str, list[str]]]  # id -> identity type -> values, oldest first

_MAPPING = (
    text("SELECT * FROM unnest(CAST(:old AS uuid[]), CAST(:new AS uuid[])) AS m(old, new)")
    .columns(old=UUID(as_uuid=True), new=UUID(as_uuid=True))
    .subquery("m")
)


async def fold_contacts(conn: AsyncConnection, folds: dict[uuid.UUID, uuid.UUID]) -> set[uuid.UUID]:
    """Delete the contacts of merged-away profiles (``folds``: merged -> canonical);
    the ids that had one."""
    gone = await conn.execute(
        delete(crm_contacts)
        .where(crm_contacts.c.profile_id.in_(list(folds)))
        .returning(crm_contacts.c.profile_id)
    )
    return set(gone.scalars())


async def fold_interactions(
    conn: AsyncConnection, folds: dict[uuid.UUID, uuid.UUID]
) -> list[tuple[int, uuid.UUID]]:
    """Move the interactions of merged-away profiles to the canonical ones: each moved
    interaction's id with the profile it came from."""
    moved = await conn.execute(
        update(crm_interactions)
        .where(crm_interactions.c.profile_id == _MAPPING.c.old)
        .values(profile_id=_MAPPING.c.new)
        .returning(crm_interactions.c.id, _MAPPING.c.old),
        {"old": list(folds), "new": list(folds.values())},
    )
    return [(r.id, r.old) for r in moved]


async def follow_events(conn: AsyncConnection, profile_ids: Iterable[uuid.UUID]) -> set[int]:
    """Move the interactions of ``profile_ids`` to the profile their event is on now
    (after an unmerge moved events between two profiles); the moved ones' ids."""
    back = await conn.execute(
        update(crm_interactions)
        .where(
            crm_interactions.c.profile_id.in_(sorted(profile_ids)),
            crm_interactions.c.source_id == events.c.source_id,
            crm_interactions.c.message_id == events.c.message_id,
            events.c.profile_id != crm_interactions.c.profile_id,
        )
        .values(profile_id=events.c.profile_id)
        .returning(crm_interactions.c.id)
    )
    return set(back.scalars())


async def insert_interactions(conn: AsyncConnection, rows: list[dict[str, Any]]) -> set[int]:
    """Store interactions, each once per source event; the ids of those new."""
    names = ("profile_id", "source_id", "message_id", "kind", "occurred_at", "details")
    inserted = await conn.execute(
        insert(crm_interactions)
        .from_select(names, unnested(crm_interactions, names, rows))
        .on_conflict_do_nothing(constraint="crm_interactions_event_key")
        .returning(crm_interactions.c.id)
    )
    return set(inserted.scalars())


# The feed's two reads of a whole batch's people, by ``driver``: on a backlog, thousands of
# rows a batch, whose SQLAlchemy rows cost more client CPU than the statements. The types
# are a filter (``IS TRUE``), not a key of the index scan: as one, Postgres 15 descends the
# index once per profile and type, three times per profile (in ``benchmarks/pipeline.py``
# this read took 12.9-13.4 ms a call, 10% of Postgres's time; as a filter 6.5-7.4 ms, 5%).
_HELD = """
SELECT profile_id, type, value FROM identities
WHERE profile_id = ANY($1::uuid[]) AND (type = ANY($2::text[])) IS TRUE
ORDER BY created_at, value
"""
_CONTACTS = "SELECT * FROM crm_contacts WHERE profile_id = ANY($1::uuid[])"


async def read_held(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> Held:
    """The identities a contact shows, of each of ``ids``."""
    held: Held = {pid: {} for pid in ids}
    rows = await driver(conn, lambda db: db.fetch(_HELD, list(held), list(IDENTITY_TYPES)))
    for pid, type_, value in rows:
        held[pid].setdefault(type_, []).append(value)
    return held


async def read_contacts(
    conn: AsyncConnection, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """The stored contacts of ``ids``, each as a dict of its columns."""
    rows = await driver(conn, lambda db: db.fetch(_CONTACTS, list(ids)))
    return {r["profile_id"]: dict(r) for r in rows}


async def leads(conn: AsyncConnection, pids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which profiles have a stored form submit or sign-up (the events table is the
    truth: it also holds what happened before the CRM feed ran)."""
    if not pids:
        return set()
    rows = await conn.execute(
        select(events.c.profile_id)
        .where(
            among(events.c.profile_id, pids),
            events.c.type == "track",
            name_key_of(events.c.event).in_(list(LEAD_KINDS)),
        )
        .distinct()
    )
    return set(rows.scalars())


def _upsert(rows: list[dict[str, Any]]) -> Insert:
    names = ("profile_id", *CONTACT_FIELDS)
    stmt = insert(crm_contacts).from_select(names, unnested(crm_contacts, names, rows))
    return stmt.on_conflict_do_update(
        index_elements=[crm_contacts.c.profile_id],
        set_={**{f: stmt.excluded[f] for f in CONTACT_FIELDS}, "updated_at": func.now()},
    )


async def upsert_contacts(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Write contacts (``profile_id`` and :data:`CONTACT_FIELDS`)."""
    await conn.execute(_upsert(rows))


async def upsert_contacts_returning(
    conn: AsyncConnection, rows: list[dict[str, Any]]
) -> list[Row[Any]]:
    """:func:`upsert_contacts`, and the rows as stored, for the webhook's messages only:
    on a backlog, fetching these rows and building messages from them was ~12% of
    activation's CPU (py-spy)."""
    return list(await conn.execute(_upsert(rows).returning(*crm_contacts.c)))


async def delete_contacts(conn: AsyncConnection, pids: list[uuid.UUID]) -> None:
    await conn.execute(delete(crm_contacts).where(crm_contacts.c.profile_id.in_(pids)))


async def unseen_interactions(
    conn: AsyncConnection,
    heads: list[uuid.UUID],
    ids: set[int],
    created: list[uuid.UUID],
    known: set[int],
) -> list[Row[Any]]:
    """Interactions of profiles with a contact among ``heads``: those of ``ids`` and every
    one of the ``created`` contacts, but for ``known`` ones; oldest first."""
    with_contact = select(crm_contacts.c.profile_id).where(crm_contacts.c.profile_id.in_(heads))
    rows = await conn.execute(
        select(crm_interactions)
        .where(
            crm_interactions.c.id.in_(list(ids)) | crm_interactions.c.profile_id.in_(created),
            crm_interactions.c.profile_id.in_(with_contact),
            crm_interactions.c.id.not_in(list(known)),
        )
        .order_by(crm_interactions.c.occurred_at, crm_interactions.c.id)
    )
    return list(rows)


async def erase(conn: AsyncConnection, everyone: list[uuid.UUID]) -> None:
    """Forget deleted people: what activation keeps of them (``delete_activation_rows``,
    again: a batch in flight may have written since the erasure) and their webhook
    deliveries (but the ``contact.deleted`` ones that tell the CRM so)."""
    await delete_activation_rows(conn, everyone)
    about = crm_webhook_deliveries.c.payload["profile_id"].astext
    is_deletion = crm_webhook_deliveries.c.payload["type"].astext == "contact.deleted"
    keys = [str(i) for i in everyone]
    await conn.execute(delete(crm_webhook_deliveries).where(about.in_(keys), ~is_deletion))


async def told_erased(conn: AsyncConnection, profile_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of them the webhook queue already has a ``contact.deleted`` (erased) for."""
    about = crm_webhook_deliveries.c.payload["profile_id"].astext
    erasure = crm_webhook_deliveries.c.payload["reason"].astext == "erased"
    keys = [str(i) for i in profile_ids]
    rows = await conn.execute(select(about).where(about.in_(keys), erasure))
    return {uuid.UUID(r) for r in rows.scalars()}


async def queue_deliveries(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Queue webhook deliveries (``kind``, ``payload``) for ``webhook.py`` to send."""
    await conn.execute(insert(crm_webhook_deliveries), rows)


# --- the webhook queue (``webhook.py``), each call its own short transaction --------------


def _seconds(value: float) -> ColumnElement[timedelta]:
    return literal(timedelta(seconds=value), Interval())


async def claim_due(conn: AsyncConnection, limit: int, lease_s: float) -> list[Row[Any]]:
    """Lease up to ``limit`` due pending deliveries for ``lease_s``, oldest first, skipping
    rows another sender holds: ``id``, ``kind``, ``body`` (the payload's JSON text),
    ``attempts``."""
    t = crm_webhook_deliveries.c
    due = (
        select(t.id)
        .where(t.status == "pending", t.next_attempt_at <= func.now())
        .order_by(t.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = await conn.execute(
        update(crm_webhook_deliveries)
        .where(t.id.in_(due))
        .values(next_attempt_at=func.now() + _seconds(lease_s))
        .returning(t.id, t.kind, cast(t.payload, Text).label("body"), t.attempts)
    )
    return list(rows)


async def mark_delivered(conn: AsyncConnection, delivery_id: int, attempts: int) -> None:
    await conn.execute(
        update(crm_webhook_deliveries)
        .where(crm_webhook_deliveries.c.id == delivery_id)
        .values(status="delivered", attempts=attempts, delivered_at=func.now(), last_error=None)
    )


async def mark_failed(
    conn: AsyncConnection, delivery_id: int, attempts: int, status: str, error: str, wait: float
) -> None:
    """Record a failed try: ``pending`` again after ``wait`` seconds, or ``dead``."""
    await conn.execute(
        update(crm_webhook_deliveries)
        .where(crm_webhook_deliveries.c.id == delivery_id)
        .values(
            status=status,
            attempts=attempts,
            last_error=error,
            next_attempt_at=func.now() + _seconds(wait),
        )
    )


async def release(conn: AsyncConnection, ids: list[int]) -> None:
    """Make leased, still pending deliveries due now."""
    t = crm_webhook_deliveries.c
    await conn.execute(
        update(crm_webhook_deliveries)
        .where(among(t.id, ids), t.status == "pending")
        .values(next_attempt_at=func.now())
    )


async def delete_delivered(conn: AsyncConnection, keep_s: float) -> int:
    """Delete deliveries delivered more than ``keep_s`` ago; how many."""
    t = crm_webhook_deliveries.c
    result = await conn.execute(
        delete(crm_webhook_deliveries).where(
            t.status == "delivered", t.delivered_at < func.now() - _seconds(keep_s)
        )
    )
    return int(result.rowcount)


async def requeue_dead(conn: AsyncConnection) -> int:
    """Every dead delivery pending again, attempts from zero, due now; how many."""
    t = crm_webhook_deliveries.c
    rows = await conn.execute(
        update(crm_webhook_deliveries)
        .where(t.status == "dead")
        .values(status="pending", attempts=0, next_attempt_at=func.now())
        .returning(t.id)
    )
    return len(rows.all())
