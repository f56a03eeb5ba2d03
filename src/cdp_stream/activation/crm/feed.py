"""The CRM feed's step in the activation consumer: a micro-batch of
``cdp.profile-updates`` -> contacts, interactions and the webhook queue, inside the
consumer's transaction. The steps run in order (each says why it comes where it does);
what a contact or an interaction is lives in ``contacts.py`` and ``interactions.py``,
the SQL in ``repository.py``.

Idempotent, since the topic is at-least-once: a contact is re-derived from the profile as
it is now (never from an update's deltas), an interaction is unique per source event.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream import logs
from cdp_stream.activation.crm import repository as crm_repo
from cdp_stream.activation.crm.contacts import (
    contact_of,
    is_customer,
    may_become_contact,
    unchanged,
)
from cdp_stream.activation.crm.interactions import interaction_of
from cdp_stream.activation.crm.messages import Outgoing
from cdp_stream.identity import IdentityRules
from cdp_stream.payload import as_mapping
from cdp_stream.profiles import repository as repo
from cdp_stream.settings import Settings
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)


@dataclass
class _Announced:
    """Interactions to tell the CRM about, and those it knows already (under a contact
    merged away now: ``contact.merged`` moves them)."""

    new: set[int] = field(default_factory=set)
    known: set[int] = field(default_factory=set)


async def apply_updates(
    conn: AsyncConnection, updates: Sequence[ProfileUpdate], settings: Settings
) -> dict[uuid.UUID, dict[str, Any]]:
    """Bring contacts, interactions and the webhook queue up to date with a micro-batch of
    ``cdp.profile-updates``, inside the caller's transaction. Safe to run again on the same
    updates (redelivery) and concurrently with other activation consumers. Returns the
    canonical profiles it read (the updates' people as they are now), for the audiences
    to use in the same transaction instead of reading them again."""
    tombstones = [u for u in updates if u.type == "deleted"]
    changes = [u for u in updates if u.type != "deleted"]
    split = {i for u in changes for i in u.split_ids()}
    atoms = {i for u in changes for i in u.profile_ids()} | split
    erased = [ids for u in tombstones if (ids := u.profile_ids())]
    canonical = await repo.canonical_ids(conn, atoms)
    # Activation consumers on different partitions can meet on one person (an update keyed
    # by a merged-away id): serialize them per profile, in key order so they never deadlock.
    locked = atoms | set(canonical.values()) | {i for ids in erased for i in ids}
    await repo.lock_keys(conn, [repo.lock_key("crm", str(i)) for i in locked])
    out, announced = Outgoing(), _Announced()
    # Folds and splits first: the interactions stored next land on the profile as it is.
    await _fold(conn, {a: c for a, c in canonical.items() if a != c}, announced, out)
    if split:
        announced.new |= await crm_repo.follow_events(conn, split)
    announced.new |= await _record_interactions(conn, changes, canonical, settings)
    # Contacts after the interactions: a contact created now announces its whole history.
    heads = sorted(set(canonical.values()))
    state = await repo.canonical_profiles(conn, heads) if heads else {}
    held = await crm_repo.read_held(conn, state) if state else {}
    webhook = bool(settings.crm_webhook_url)
    created = await _write_contacts(conn, heads, state, held, settings, out if webhook else None)
    if webhook and (announced.new or created):
        for row in await crm_repo.unseen_interactions(
            conn, heads, announced.new - announced.known, created, announced.known
        ):
            out.interaction(dict(row._mapping))
    if erased:
        await _erase(conn, erased, out if webhook else None)
    if webhook and out.rows:
        await crm_repo.queue_deliveries(conn, out.rows)
    return state


async def _fold(
    conn: AsyncConnection,
    folds: dict[uuid.UUID, uuid.UUID],
    announced: _Announced,
    out: Outgoing,
) -> None:
    """Fold merged-away profiles (``folds``: merged -> canonical) into their canonical
    one: their contact goes (``contact.merged``), their interactions move."""
    if not folds:
        return
    had_contact = await crm_repo.fold_contacts(conn, folds)
    # The CRM knew a merged-away contact's interactions already (``contact.merged``
    # moves them); an anonymous profile's are news to it.
    for interaction_id, old in await crm_repo.fold_interactions(conn, folds):
        (announced.known if old in had_contact else announced.new).add(interaction_id)
    for merged in sorted(had_contact):
        out.merged(merged, folds[merged])


async def _record_interactions(
    conn: AsyncConnection,
    changes: Sequence[ProfileUpdate],
    canonical: dict[uuid.UUID, uuid.UUID],
    settings: Settings,
) -> set[int]:
    """Store the interactions the updates' events are, each once per source event, on
    the canonical profile; the ids of the new ones."""
    rows = []
    for change in changes:
        ids = change.profile_ids()
        home = canonical.get(ids[0]) if ids else None
        for raw in change.events:
            event = as_mapping(raw)
            if home is None or not event.get("sourceId") or not event.get("messageId"):
                continue
            try:
                found = interaction_of(event, settings.crm_key_pages)
            except (KeyError, TypeError, ValueError) as exc:  # no usable timestamp
                with logs.bind(messageId=event.get("messageId"), profile_id=str(home)):
                    log.warning("no CRM interaction for this event: %r", exc)
                continue
            if found is not None:
                rows.append(
                    {
                        "profile_id": home,
                        "source_id": str(event["sourceId"]),
                        "message_id": str(event["messageId"]),
                        "kind": found.kind,
                        "occurred_at": found.occurred_at,
                        "details": found.details,
                    }
                )
    return await crm_repo.insert_interactions(conn, rows) if rows else set()


async def _write_contacts(
    conn: AsyncConnection,
    heads: list[uuid.UUID],
    state: dict[uuid.UUID, dict[str, Any]],
    held: crm_repo.Held,
    settings: Settings,
    out: Outgoing | None,
) -> list[uuid.UUID]:
    """Upsert the contacts of ``heads`` (``state``, ``held``: the canonical ones as read)
    where a field changed (queueing them in ``out`` for the webhook, if there is one), drop
    those that no longer qualify; returns the newly created ones."""
    if not heads:
        return []
    existing = await crm_repo.read_contacts(conn, heads)
    # Only a would-be subscriber needs its stored events read: a lead or customer stays one.
    maybe_lead = [
        pid
        for pid in state
        if may_become_contact(held[pid])
        and not is_customer(state[pid]["computed"])
        and existing.get(pid, {}).get("lifecycle_stage") not in ("lead", "customer")
    ]
    leads = await crm_repo.leads(conn, maybe_lead)
    rules = IdentityRules.from_settings(settings)
    upserts: list[dict[str, Any]] = []
    created, dropped = [], []
    for pid in heads:
        before = existing.get(pid)
        contact = None
        if pid in state:
            traits, computed = state[pid]["traits"], state[pid]["computed"]
            stage = None if before is None else before["lifecycle_stage"]
            contact = contact_of(
                traits, computed, held[pid], rules, lead=pid in leads, stage_before=stage
            )
        if contact is None:
            if before is not None and pid in state:  # lost its email and user id
                dropped.append(pid)
            continue
        if unchanged(before, contact, settings.crm_activity_resolution_s):
            continue
        upserts.append({"profile_id": pid, **contact})
        if before is None:
            created.append(pid)
    if upserts:
        if out is None:  # no webhook: the stored rows need not come back
            await crm_repo.upsert_contacts(conn, upserts)
        else:
            written = await crm_repo.upsert_contacts_returning(conn, upserts)
            for r in sorted(written, key=lambda r: r.profile_id):
                out.upserted(dict(r._mapping), created=r.profile_id in created)
    if dropped:
        await crm_repo.delete_contacts(conn, dropped)
        if out is not None:
            for pid in dropped:
                out.deleted(pid, [], "no_identifier")
    return created


async def _erase(
    conn: AsyncConnection, groups: list[list[uuid.UUID]], out: Outgoing | None
) -> None:
    """Forget deleted people (``groups``: each person's profiles, the canonical first);
    queue one ``contact.deleted`` per person (once, however often the tombstone comes)."""
    await crm_repo.erase(conn, [i for ids in groups for i in ids])
    if out is None:
        return
    told = await crm_repo.told_erased(conn, [ids[0] for ids in groups])
    for head, *merged in groups:
        if head not in told:
            told.add(head)
            out.deleted(head, merged, "erased")
