"""The CRM feed: one contact per person with an email or user id, and the interactions a
salesperson wants to see, kept from ``cdp.profile-updates`` inside the activation
consumer's transaction.

Idempotent, since the topic is at-least-once: a contact is re-derived from the profile as
it is now (never from an update's deltas), an interaction is unique per source event. The
rules (contact fields, lifecycle stages, interactions, webhook payloads, erasure) are
specified in docs/crm.md.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import UUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream import logs
from cdp_stream.activation._sql import among
from cdp_stream.event_names import (
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_EVENTS,
    EMAIL_LINK_CLICKED,
    EMAIL_MARKED_AS_SPAM,
    EMAIL_OPENED,
    EMAIL_SENT,
    FORM_SUBMITTED,
    ORDER_COMPLETED,
    ORDER_REFUNDED,
    SIGNED_UP,
    UNSUBSCRIBED,
    name_key,
)
from cdp_stream.identity import EMAIL, PHONE, USER_ID, IdentityRules
from cdp_stream.payload import as_mapping
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import (
    crm_contacts,
    crm_interactions,
    crm_webhook_deliveries,
    events,
    identities,
    profiles,
)
from cdp_stream.settings import Settings
from cdp_stream.timestamps import event_time
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)

STAGES = ("subscriber", "lead", "customer")  # in order: a contact only moves right
CONTACT_FIELDS = (
    "email",
    "phone",
    "user_id",
    "first_name",
    "last_name",
    "company",
    "job_title",
    "lifecycle_stage",
    "first_touch_source",
    "last_activity_at",
)

_EMAIL_KINDS = {  # the spec's name (event_names.EMAIL_EVENTS) -> the interaction kind
    EMAIL_SENT: "email_sent",
    EMAIL_DELIVERED: "email_delivered",
    EMAIL_OPENED: "email_opened",
    EMAIL_LINK_CLICKED: "email_link_clicked",
    EMAIL_BOUNCED: "email_bounced",
    UNSUBSCRIBED: "email_unsubscribed",
    EMAIL_MARKED_AS_SPAM: "email_marked_as_spam",
}
_ORDER_KINDS = {
    name_key(ORDER_COMPLETED): "order_completed",
    name_key(ORDER_REFUNDED): "order_refunded",
}
_LEAD_KINDS = {name_key(FORM_SUBMITTED): "form_submitted", name_key(SIGNED_UP): "signed_up"}
_PAGE_KIND = "page_viewed"


# --- pure: what an event and a profile become -------------------------------------------


@dataclass(frozen=True, slots=True)
class Interaction:
    kind: str
    occurred_at: datetime
    details: dict[str, Any]


def _scalar(value: Any) -> str | int | float | None:
    """A JSON scalar worth showing (trimmed text, a number), else None: events are client
    data, and a CRM field should not receive an object or a blank."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _first(mapping: Mapping[str, Any], *names: str) -> str | int | float | None:
    for name in names:
        found = _scalar(mapping.get(name))
        if found is not None:
            return found
    return None


def _compact(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if v is not None}


def page_path(event: Mapping[str, Any]) -> str | None:
    """``context.page.path``, else ``properties.path``."""
    page = as_mapping(as_mapping(event.get("context")).get("page"))
    return _text(page.get("path")) or _text(as_mapping(event.get("properties")).get("path"))


def is_key_page(path: str, prefixes: Iterable[str]) -> bool:
    """Whole-segment prefix match, ignoring case and any query or fragment."""
    path = path.split("?", 1)[0].split("#", 1)[0].casefold()
    for prefix in prefixes:
        prefix = prefix.strip().casefold()
        if not prefix:
            continue
        if prefix.endswith("/"):
            if path.startswith(prefix):
                return True
        elif path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def interaction_of(event: Mapping[str, Any], key_pages: Sequence[str]) -> Interaction | None:
    """The CRM interaction an event is, or None when it is not worth a salesperson's eye."""
    props = as_mapping(event.get("properties"))
    context = as_mapping(event.get("context"))
    page = as_mapping(context.get("page"))
    kind: str | None = None
    details: dict[str, Any] = {}
    if event.get("type") == "page":
        path = page_path(event)
        if path is None or not is_key_page(path, key_pages):
            return None
        kind = _PAGE_KIND
        details = {
            "path": path,
            "url": _first(props, "url") or _scalar(page.get("url")),
            "title": _first(props, "title") or _scalar(page.get("title")),
            "name": _scalar(event.get("name")),
            "referrer": _first(props, "referrer") or _scalar(page.get("referrer")),
        }
    elif event.get("type") == "track" and isinstance(event.get("event"), str):
        name = name_key(event["event"])
        if name in EMAIL_EVENTS:
            kind = _EMAIL_KINDS[EMAIL_EVENTS[name]]
            details = {
                "campaign": _first(props, "campaign_name", "campaign"),
                "campaign_id": _first(props, "campaign_id"),
                "subject": _first(props, "email_subject", "subject"),
                "email_id": _first(props, "email_id"),
                "link_url": _first(props, "link_url"),
                "list": _first(props, "list_name", "list_id"),
            }
        elif name in _ORDER_KINDS:
            kind = _ORDER_KINDS[name]
            amount = next(
                (v for v in (props.get("revenue"), props.get("total")) if _is_number(v)), None
            )
            currency = _text(props.get("currency"))
            products = props.get("products")
            details = {
                "order_id": _first(props, "order_id", "orderId"),
                "amount": amount,
                "currency": currency.upper() if currency else ("USD" if amount else None),
                "items": [as_mapping(p) for p in products] if isinstance(products, list) else None,
            }
        elif name in _LEAD_KINDS:
            kind = _LEAD_KINDS[name]
            details = {
                "form_id": _first(props, "form_id", "formId"),
                "form_name": _first(props, "form_name", "formName", "form"),
                "method": _first(props, "method", "type"),
                "page_path": _scalar(page.get("path")),
            }
    if kind is None:
        return None
    return Interaction(kind, event_time(event["timestamp"])[0], _compact(details))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pick(values: list[str], preferred: str | None) -> str | None:
    """The identity the traits currently name, else the oldest (``values`` are oldest
    first): a person with several emails shows the one they last gave."""
    if preferred is not None and preferred in values:
        return preferred
    return values[0] if values else None


def _names(traits: Mapping[str, Any]) -> tuple[str | None, str | None]:
    first = _text(traits.get("firstName")) or _text(traits.get("first_name"))
    last = _text(traits.get("lastName")) or _text(traits.get("last_name"))
    full = _text(traits.get("name"))
    if full and not (first and last):
        head, _, rest = full.partition(" ")
        first = first or head
        last = last or (rest.strip() or None)
    return first, last


def contact_of(
    traits: Mapping[str, Any],
    computed: Mapping[str, Any],
    ids: Mapping[str, list[str]],
    rules: IdentityRules,
    *,
    lead: bool,
    stage_before: str | None,
) -> dict[str, Any] | None:
    """The contact fields of a profile, or None when it has neither email nor user id.

    ``ids`` maps identity type to values, oldest first; ``lead``: a form submit or sign-up
    is stored for it; ``stage_before``: the contact's current stage, which is never lowered.
    """
    emails, user_ids, phones = ids.get(EMAIL, []), ids.get(USER_ID, []), ids.get(PHONE, [])
    if not emails and not user_ids:
        return None
    first, last = _names(traits)
    company = traits.get("company")
    company = _text(company) or _text(as_mapping(company).get("name"))
    touch = as_mapping(computed.get("first_touch"))
    order_count = computed.get("order_count")
    stage = "customer" if isinstance(order_count, int) and order_count > 0 else "subscriber"
    if stage == "subscriber" and lead:
        stage = "lead"
    if stage_before in STAGES and STAGES.index(stage_before) > STAGES.index(stage):
        stage = stage_before
    last_seen = computed.get("last_seen")
    return {
        "email": _pick(emails, rules.normalize(EMAIL, traits.get("email"))),
        "phone": _pick(phones, rules.normalize(PHONE, traits.get("phone"))),
        "user_id": _pick(user_ids, None),
        "first_name": first,
        "last_name": last,
        "company": company,
        "job_title": _text(traits.get("title"))
        or _text(traits.get("job_title"))
        or _text(traits.get("jobTitle")),
        "lifecycle_stage": stage,
        "first_touch_source": _text(touch.get("source")) or _text(touch.get("referrer")),
        "last_activity_at": event_time(last_seen)[0] if isinstance(last_seen, str) else None,
    }


def contact_json(profile_id: uuid.UUID, contact: Mapping[str, Any]) -> dict[str, Any]:
    """A contact as the webhook and the API show it (times as ISO 8601)."""
    out: dict[str, Any] = {"profile_id": str(profile_id)}
    for name in (*CONTACT_FIELDS, "created_at", "updated_at"):
        value = contact.get(name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def interaction_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "profile_id": str(row["profile_id"]),
        "source_id": row["source_id"],
        "message_id": row["message_id"],
        "kind": row["kind"],
        "occurred_at": row["occurred_at"].isoformat(),
        "details": row["details"],
    }


# --- the batch ----------------------------------------------------------------------------


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _ids_of(update: ProfileUpdate) -> list[uuid.UUID]:
    """The update's profile id first, then its merged ids; malformed ones are dropped."""
    return [u for u in map(_uuid, [update.profile_id, *update.merged_ids]) if u is not None]


def _split_of(update: ProfileUpdate) -> list[uuid.UUID]:
    """Both profiles an unmerge made, from the update of one (``split_from``), else none."""
    other = _uuid(update.split_from)
    return [] if other is None else [*_ids_of(update)[:1], other]


async def _canonical(conn: AsyncConnection, ids: set[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """Each id's canonical profile (itself when canonical); a deleted profile is absent."""
    out: dict[uuid.UUID, uuid.UUID] = {}
    pending = {i: i for i in ids}
    for _ in range(16):  # merges point straight at the canonical profile: 1-2 rounds
        if not pending:
            break
        rows = await conn.execute(
            select(profiles.c.id, profiles.c.merged_into).where(
                among(profiles.c.id, set(pending.values()))
            )
        )
        parent = {r.id: r.merged_into for r in rows}
        following: dict[uuid.UUID, uuid.UUID] = {}
        for origin, current in pending.items():
            if current not in parent:
                continue
            if parent[current] is None:
                out[origin] = current
            else:
                following[origin] = parent[current]
        pending = following
    return out


_MAPPING = (
    text("SELECT * FROM unnest(CAST(:old AS uuid[]), CAST(:new AS uuid[])) AS m(old, new)")
    .columns(old=UUID(as_uuid=True), new=UUID(as_uuid=True))
    .subquery("m")
)


@dataclass
class _Outgoing:
    """Webhook deliveries of one batch, queued in order at its end."""

    rows: list[dict[str, Any]]

    def add(self, kind: str, payload: dict[str, Any]) -> None:
        self.rows.append({"kind": kind, "payload": payload})


async def apply_updates(
    conn: AsyncConnection, updates: Sequence[ProfileUpdate], settings: Settings
) -> None:
    """Bring contacts, interactions and the webhook queue up to date with a micro-batch of
    ``cdp.profile-updates``, inside the caller's transaction. Safe to run again on the same
    updates (redelivery) and concurrently with other activation consumers."""
    tombstones = [u for u in updates if u.type == "deleted"]
    changes = [u for u in updates if u.type != "deleted"]
    split = {i for u in changes for i in _split_of(u)}
    atoms = {i for u in changes for i in _ids_of(u)} | split
    erased = [ids for u in tombstones if (ids := _ids_of(u))]
    canonical = await _canonical(conn, atoms)
    # Activation consumers on different partitions can meet on one person (an update keyed
    # by a merged-away id): serialize them per profile, in key order so they never deadlock.
    await repo.lock_keys(
        conn,
        [
            repo.lock_key("crm", str(i))
            for i in atoms | set(canonical.values()) | {i for ids in erased for i in ids}
        ],
    )
    out = _Outgoing([])
    webhook = bool(settings.crm_webhook_url)

    # Fold merged-away profiles into their canonical one.
    folds = {a: c for a, c in canonical.items() if a != c}
    had_contact: set[uuid.UUID] = set()
    announce: set[int] = set()
    known: set[int] = set()  # the CRM has them, under a contact merged away now
    if folds:
        gone = await conn.execute(
            delete(crm_contacts)
            .where(crm_contacts.c.profile_id.in_(list(folds)))
            .returning(crm_contacts.c.profile_id)
        )
        had_contact = set(gone.scalars())
        moved = await conn.execute(
            update(crm_interactions)
            .where(crm_interactions.c.profile_id == _MAPPING.c.old)
            .values(profile_id=_MAPPING.c.new)
            .returning(crm_interactions.c.id, _MAPPING.c.old),
            {"old": list(folds), "new": list(folds.values())},
        )
        # The CRM knew a merged-away contact's interactions already (``contact.merged``
        # moves them); an anonymous profile's are news to it.
        for r in moved:
            (known if r.old in had_contact else announce).add(r.id)
        for merged in sorted(had_contact):
            out.add(
                "contact",
                {
                    "type": "contact.merged",
                    "profile_id": str(merged),
                    "merged_into": str(folds[merged]),
                },
            )

    # An unmerge moved events between two profiles: their interactions follow them (and
    # are announced again under their new profile, with the same id: a move).
    if split:
        back = await conn.execute(
            update(crm_interactions)
            .where(
                crm_interactions.c.profile_id.in_(sorted(split)),
                crm_interactions.c.source_id == events.c.source_id,
                crm_interactions.c.message_id == events.c.message_id,
                events.c.profile_id != crm_interactions.c.profile_id,
            )
            .values(profile_id=events.c.profile_id)
            .returning(crm_interactions.c.id)
        )
        announce |= set(back.scalars())

    # Interactions, each once per source event.
    new_rows = []
    for u, raw in [(change, raw) for change in changes for raw in change.events]:
        ids = _ids_of(u)
        event = as_mapping(raw)
        home = canonical.get(ids[0]) if ids else None
        if home is None or not event.get("sourceId") or not event.get("messageId"):
            continue
        try:
            found = interaction_of(event, settings.crm_key_pages)
        except (KeyError, TypeError, ValueError) as exc:  # no usable timestamp
            with logs.bind(messageId=event.get("messageId"), profile_id=str(home)):
                log.warning("no CRM interaction for this event: %r", exc)
            continue
        if found is not None:
            new_rows.append(
                {
                    "profile_id": home,
                    "source_id": str(event["sourceId"]),
                    "message_id": str(event["messageId"]),
                    "kind": found.kind,
                    "occurred_at": found.occurred_at,
                    "details": found.details,
                }
            )
    if new_rows:
        inserted = await conn.execute(
            insert(crm_interactions)
            .on_conflict_do_nothing(constraint="crm_interactions_event_key")
            .returning(crm_interactions.c.id),
            new_rows,
        )
        announce |= set(inserted.scalars())

    # Contacts, re-derived from the canonical profiles as they are now.
    heads = sorted(set(canonical.values()))
    created = await _write_contacts(conn, heads, settings, out)

    if webhook and (announce or created):
        await _announce_interactions(conn, heads, announce - known, created, known, out)
    if erased:
        await _erase(conn, erased, out if webhook else None)
    if webhook and out.rows:
        await conn.execute(insert(crm_webhook_deliveries), out.rows)


async def _write_contacts(
    conn: AsyncConnection, heads: list[uuid.UUID], settings: Settings, out: _Outgoing
) -> list[uuid.UUID]:
    """Upsert the contacts of ``heads`` where a field changed (queueing them for the
    webhook), drop those that no longer qualify; returns the newly created ones."""
    if not heads:
        return []
    rules = IdentityRules.from_settings(settings)
    found = await conn.execute(
        select(profiles.c.id, profiles.c.traits, profiles.c.computed).where(
            among(profiles.c.id, heads), profiles.c.merged_into.is_(None)
        )
    )
    state = {r.id: (r.traits, r.computed) for r in found}
    held: dict[uuid.UUID, dict[str, list[str]]] = {pid: {} for pid in state}
    rows = await conn.execute(
        select(identities.c.profile_id, identities.c.type, identities.c.value)
        .where(
            among(identities.c.profile_id, state),
            identities.c.type.in_([EMAIL, USER_ID, PHONE]),
        )
        .order_by(identities.c.created_at, identities.c.value)
    )
    for r in rows:
        held[r.profile_id].setdefault(r.type, []).append(r.value)
    existing = {
        r.profile_id: dict(r._mapping)
        for r in await conn.execute(
            select(crm_contacts).where(among(crm_contacts.c.profile_id, heads))
        )
    }
    # Only a would-be subscriber needs its stored events read: a lead or customer stays one.
    maybe_lead = [
        pid
        for pid in state
        if (held[pid].get(EMAIL) or held[pid].get(USER_ID))
        and not _ordered(state[pid][1])
        and existing.get(pid, {}).get("lifecycle_stage") not in ("lead", "customer")
    ]
    leads = await _leads(conn, maybe_lead)

    upserts, created, dropped = [], [], []
    for pid in heads:
        before = existing.get(pid)
        contact = None
        if pid in state:
            traits, computed = state[pid]
            contact = contact_of(
                traits,
                computed,
                held[pid],
                rules,
                lead=pid in leads,
                stage_before=None if before is None else before["lifecycle_stage"],
            )
        if contact is None:
            if before is not None and pid in state:  # lost its email and user id
                dropped.append(pid)
            continue
        if before is not None and all(before[f] == contact[f] for f in CONTACT_FIELDS):
            continue
        upserts.append({"profile_id": pid, **contact})
        if before is None:
            created.append(pid)
    if upserts:
        stmt = insert(crm_contacts)
        written = await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[crm_contacts.c.profile_id],
                set_={**{f: stmt.excluded[f] for f in CONTACT_FIELDS}, "updated_at": func.now()},
            ).returning(*crm_contacts.c),
            upserts,
        )
        for r in sorted(written, key=lambda r: r.profile_id):
            out.add(
                "contact",
                {
                    "type": "contact.upserted",
                    "profile_id": str(r.profile_id),
                    "created": r.profile_id in created,
                    "contact": contact_json(r.profile_id, dict(r._mapping)),
                },
            )
    if dropped:
        await conn.execute(delete(crm_contacts).where(crm_contacts.c.profile_id.in_(dropped)))
        for pid in dropped:
            out.add(
                "contact",
                {
                    "type": "contact.deleted",
                    "profile_id": str(pid),
                    "merged_ids": [],
                    "reason": "no_identifier",
                },
            )
    return created


def _ordered(computed: Mapping[str, Any]) -> bool:
    count = computed.get("order_count")
    return isinstance(count, int) and count > 0


async def _leads(conn: AsyncConnection, pids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which profiles have a stored form submit or sign-up (the events table is the
    truth: it also holds what happened before the CRM feed ran)."""
    if not pids:
        return set()
    rows = await conn.execute(
        select(events.c.profile_id)
        .where(
            among(events.c.profile_id, pids),
            events.c.type == "track",
            func.lower(func.btrim(events.c.event)).in_(list(_LEAD_KINDS)),
        )
        .distinct()
    )
    return set(rows.scalars())


async def _announce_interactions(
    conn: AsyncConnection,
    heads: list[uuid.UUID],
    ids: set[int],
    created: list[uuid.UUID],
    known: set[int],
    out: _Outgoing,
) -> None:
    """Queue the interactions the CRM has not seen: new or newly folded ones of profiles
    with a contact, and the history of a contact created now (but for ``known`` ones)."""
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
    for r in rows:
        item = interaction_json(dict(r._mapping))
        out.add(
            "interaction",
            {"type": "interaction.created", "profile_id": item["profile_id"], "interaction": item},
        )


async def _erase(
    conn: AsyncConnection, groups: list[list[uuid.UUID]], out: _Outgoing | None
) -> None:
    """Forget deleted people: their contacts, interactions and webhook deliveries; queue
    one ``contact.deleted`` per person (once, however often the tombstone comes)."""
    everyone = [i for ids in groups for i in ids]
    await conn.execute(delete(crm_contacts).where(crm_contacts.c.profile_id.in_(everyone)))
    await conn.execute(delete(crm_interactions).where(crm_interactions.c.profile_id.in_(everyone)))
    keys = [str(i) for i in everyone]
    about = crm_webhook_deliveries.c.payload["profile_id"].astext
    is_deletion = crm_webhook_deliveries.c.payload["type"].astext == "contact.deleted"
    await conn.execute(delete(crm_webhook_deliveries).where(about.in_(keys), ~is_deletion))
    if out is None:
        return
    erasure = crm_webhook_deliveries.c.payload["reason"].astext == "erased"
    told = set((await conn.execute(select(about).where(about.in_(keys), erasure))).scalars())
    for head, *merged in groups:
        if str(head) not in told:
            told.add(str(head))
            out.add(
                "contact",
                {
                    "type": "contact.deleted",
                    "profile_id": str(head),
                    "merged_ids": [str(m) for m in merged],
                    "reason": "erased",
                },
            )
