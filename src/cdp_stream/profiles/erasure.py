"""Erasure of a person (a data-rights request): their profiles, identities, events,
orders, merges, refusals, pending updates, CRM rows and audience membership deleted, their
identifiers remembered sealed in the suppression list, and a tombstone queued for every
consumer of ``cdp.profile-updates``, all in the caller's transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

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
    profile_update_outbox,
    profiles,
    suppressed_identifiers,
)
from cdp_stream.profiles.outbox import Update, insert_outbox
from cdp_stream.profiles.repository import group_ids
from cdp_stream.profiles.suppression import sealed_rows
from cdp_stream.sealing import SuppressionKeys
from cdp_stream.updates import ProfileUpdate


@dataclass(frozen=True, slots=True)
class Erased:
    """What ``erase`` did: the canonical profile, the profiles merged into it, and the
    outbox row of the tombstone (for the caller to publish once it commits)."""

    profile_id: uuid.UUID
    merged_ids: list[uuid.UUID]
    outbox_ids: list[int]


async def erase(
    conn: AsyncConnection, canonical: uuid.UUID, suppression: SuppressionKeys
) -> Erased:
    """``delete_group``, then a tombstone ``{"type": "deleted", "profile_id",
    "merged_ids"}`` in the outbox, so every consumer forgets the person."""
    ids = await delete_group(conn, canonical, suppression)
    merged = [i for i in ids if i != canonical]
    tombstone = ProfileUpdate(
        type="deleted", profile_id=str(canonical), merged_ids=[str(i) for i in merged]
    )
    queued = await insert_outbox(conn, [Update(str(canonical), tombstone.payload())])
    return Erased(canonical, merged, queued)


async def delete_group(
    conn: AsyncConnection, canonical: uuid.UUID, suppression: SuppressionKeys
) -> list[uuid.UUID]:
    """Erase a person: the canonical profile and every profile merged into it, with their
    identities (remembered sealed in the suppression list), events, merges, refusals,
    pending updates, CRM contact and interactions, audience membership. Returns the ids."""
    await conn.execute(select(profiles.c.id).where(profiles.c.id == canonical).with_for_update())
    ids = list((await conn.execute(group_ids(canonical))).scalars())
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
    ):
        await conn.execute(delete(table).where(column.in_(ids)))
    await delete_activation_rows(conn, ids)
    await conn.execute(delete(profile_update_outbox).where(profile_update_outbox.c.key.in_(keys)))
    await conn.execute(
        delete(profile_merges).where(
            profile_merges.c.canonical_id.in_(ids) | profile_merges.c.merged_id.in_(ids)
        )
    )
    await conn.execute(update(profiles).where(profiles.c.id.in_(ids)).values(merged_into=None))
    await conn.execute(delete(profiles).where(profiles.c.id.in_(ids)))
    return ids


async def delete_activation_rows(conn: AsyncConnection, ids: list[uuid.UUID]) -> None:
    """What activation keeps about the profiles: CRM contact and interactions, audience
    membership and its history. The one list of them, used by ``delete_group`` (at once,
    in the erasure's transaction) and by activation's tombstone handler (again, for what a
    batch in flight wrote meanwhile)."""
    for table, column in (
        (crm_contacts, crm_contacts.c.profile_id),
        (crm_interactions, crm_interactions.c.profile_id),
        (audience_members, audience_members.c.profile_id),
        (audience_changes, audience_changes.c.profile_id),
    ):
        await conn.execute(delete(table).where(column.in_(ids)))
