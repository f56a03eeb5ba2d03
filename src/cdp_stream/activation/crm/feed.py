"""The CRM feed's step in the activation consumer: a micro-batch of
``cdp.profile-updates`` -> contacts, interactions and the webhook queue, inside the
consumer's transaction. What an update's events make (its interactions) depends on them
alone and is worked out as the consumer decodes it (:func:`incoming`), ahead of the
transaction. The steps run in order (each says why it comes where it does); what a
contact or an interaction is lives in ``contacts.py`` and ``interactions.py``, the SQL in
``repository.py``.

Idempotent, since the topic is at-least-once: a contact is re-derived from the profile as
it is now (never from an update's deltas), an interaction is unique per source event.
"""

from __future__ import annotations

import asyncio
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
from cdp_stream.activation.crm.interactions import Interaction, interaction_of
from cdp_stream.activation.crm.messages import Outgoing
from cdp_stream.identity import IdentityRules
from cdp_stream.payload import as_mapping
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import beside
from cdp_stream.settings import Settings
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A profile update and the CRM interactions its events are (source id, message id,
    interaction): they depend on the events alone, so the activation consumer works them
    out while decoding, ahead of the batch's transaction, and keeps the update without
    its events (nothing after needs them: a batch taken ahead holds a fraction of the
    objects, which the collection after each batch walks)."""

    update: ProfileUpdate
    interactions: list[tuple[str, str, Interaction]]


def incoming(update: ProfileUpdate, settings: Settings) -> Incoming:
    found = []
    for raw in update.events if update.type != "deleted" else ():
        event = as_mapping(raw)
        if not event.get("sourceId") or not event.get("messageId"):
            continue
        try:
            interaction = interaction_of(event, settings.crm_key_pages)
        except (KeyError, TypeError, ValueError) as exc:  # no usable timestamp
            with logs.bind(messageId=event.get("messageId"), profile_id=update.profile_id):
                log.warning("no CRM interaction for this event: %r", exc)
            continue
        if interaction is not None:
            found.append((str(event["sourceId"]), str(event["messageId"]), interaction))
    kept = update.model_copy(update={"events": []})
    kept.profile_ids()  # parsed now too (cached), not in the transaction
    return Incoming(kept, found)


@dataclass
class _Announced:
    """Interactions to tell the CRM about, and those it knows already (under a contact
    merged away now: ``contact.merged`` moves them)."""

    new: set[int] = field(default_factory=set)
    known: set[int] = field(default_factory=set)


async def apply_updates(
    conn: AsyncConnection, batch: Sequence[Incoming], settings: Settings
) -> dict[uuid.UUID, dict[str, Any]]:
    """Bring contacts, interactions and the webhook queue up to date with a micro-batch of
    ``cdp.profile-updates``, inside the caller's transaction. Safe to run again on the same
    updates (redelivery) and concurrently with other activation consumers. Returns the
    canonical profiles it read (the updates' people as they are now), for the audiences
    to use in the same transaction instead of reading them again."""
    tombstones = [i.update for i in batch if i.update.type == "deleted"]
    changes = [i for i in batch if i.update.type != "deleted"]
    split = {p for i in changes for p in i.update.split_ids()}
    atoms = {p for i in changes for p in i.update.profile_ids()} | split
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
    heads = sorted(set(canonical.values()))
    state = await repo.canonical_profiles(conn, heads) if heads else {}
    held = await crm_repo.read_held(conn, state) if state else {}
    existing = await crm_repo.read_contacts(conn, heads) if heads else {}
    leads = await crm_repo.leads(conn, _maybe_leads(state, held, existing))
    # The interactions stored while the contacts are worked out; the contacts written
    # after them: a contact created now announces its whole history.
    stored, contacts = await beside(
        _record_interactions(conn, changes, canonical),
        _contacts(heads, state, held, existing, leads, settings),
    )
    announced.new |= stored
    webhook = bool(settings.crm_webhook_url)
    created = await _write_contacts(conn, contacts, out if webhook else None)
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
    conn: AsyncConnection, changes: Sequence[Incoming], canonical: dict[uuid.UUID, uuid.UUID]
) -> set[int]:
    """Store the updates' interactions, each once per source event, on the canonical
    profile; the ids of the new ones."""
    rows = []
    for change in changes:
        ids = change.update.profile_ids()
        home = canonical.get(ids[0]) if ids else None
        if home is None:
            continue
        for source_id, message_id, found in change.interactions:
            rows.append(
                {
                    "profile_id": home,
                    "source_id": source_id,
                    "message_id": message_id,
                    "kind": found.kind,
                    "occurred_at": found.occurred_at,
                    "details": found.details,
                }
            )
    return await crm_repo.insert_interactions(conn, rows) if rows else set()


def _maybe_leads(
    state: dict[uuid.UUID, dict[str, Any]], held: crm_repo.Held, existing: dict[uuid.UUID, Any]
) -> list[uuid.UUID]:
    """The profiles whose stored events must be read: only a would-be subscriber's (a
    lead or a customer stays one)."""
    return [
        pid
        for pid in state
        if may_become_contact(held[pid])
        and not is_customer(state[pid]["computed"])
        and existing.get(pid, {}).get("lifecycle_stage") not in ("lead", "customer")
    ]


@dataclass
class _Contacts:
    """What the contacts of a batch's profiles become."""

    upserts: list[dict[str, Any]] = field(default_factory=list)  # changed or new
    created: list[uuid.UUID] = field(default_factory=list)  # new among them
    dropped: list[uuid.UUID] = field(default_factory=list)  # lost their email and user id


# Profiles worked on between two yields to the loop while the interactions are stored.
_CHUNK = 200


async def _contacts(
    heads: list[uuid.UUID],
    state: dict[uuid.UUID, dict[str, Any]],
    held: crm_repo.Held,
    existing: dict[uuid.UUID, Any],
    leads: set[uuid.UUID],
    settings: Settings,
) -> _Contacts:
    """The contacts of ``heads`` (``state``, ``held``: the canonical ones as read;
    ``existing``: their stored contacts) where a field changed, and those that no longer
    qualify."""
    rules = IdentityRules.from_settings(settings)
    out = _Contacts()
    for n, pid in enumerate(heads):
        if n % _CHUNK == _CHUNK - 1:
            await asyncio.sleep(0)
        before = existing.get(pid)
        contact = None
        if pid in state:
            traits, computed = state[pid]["traits"], state[pid]["computed"]
            stage = None if before is None else before["lifecycle_stage"]
            contact = contact_of(
                traits, computed, held[pid], rules, lead=pid in leads, stage_before=stage
            )
        if contact is None:
            if before is not None and pid in state:
                out.dropped.append(pid)
            continue
        if unchanged(before, contact, settings.crm_activity_resolution_s):
            continue
        out.upserts.append({"profile_id": pid, **contact})
        if before is None:
            out.created.append(pid)
    return out


async def _write_contacts(
    conn: AsyncConnection, contacts: _Contacts, out: Outgoing | None
) -> list[uuid.UUID]:
    """Upsert the changed contacts (queueing them in ``out`` for the webhook, if there is
    one), delete those that no longer qualify; returns the newly created ones."""
    if contacts.upserts:
        if out is None:  # no webhook: the stored rows need not come back
            await crm_repo.upsert_contacts(conn, contacts.upserts)
        else:
            written = await crm_repo.upsert_contacts_returning(conn, contacts.upserts)
            for r in sorted(written, key=lambda r: r.profile_id):
                out.upserted(dict(r._mapping), created=r.profile_id in contacts.created)
    if contacts.dropped:
        await crm_repo.delete_contacts(conn, contacts.dropped)
        if out is not None:
            for pid in contacts.dropped:
                out.deleted(pid, [], "no_identifier")
    return contacts.created


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
