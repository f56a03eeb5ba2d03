"""The CRM feed (:mod:`cdp_stream.activation.crm.feed`) on the real Postgres server.

Events go through the resolver (``apply_with_retry``); the updates handed to
``feed.apply_updates`` are the ones it wrote to its outbox, as the activation consumer
would read them from ``cdp.profile-updates``. The database is shared by the session, so
every test uses its own identifiers and reads only its own rows.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.crm import contacts
from cdp_stream.activation.crm import feed as crm_feed
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import erasure
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import retrying
from cdp_stream.profiles.models import (
    crm_contacts,
    crm_interactions,
    crm_webhook_deliveries,
    identities,
    profile_update_outbox,
)
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.resolver.unmerge import unmerge_last
from cdp_stream.settings import Settings
from tests.support import incoming, outbox_updates, stored_event, uid

RULES = IdentityRules.from_settings(Settings())
SOURCE = "src_crm_test"
# A webhook URL makes apply_updates queue deliveries; nothing sends them in these tests.
SETTINGS = Settings(crm_key_pages=["/pricing", "/demo/"], crm_webhook_url="http://127.0.0.1:9/")
NO_WEBHOOK = SETTINGS.model_copy(update={"crm_webhook_url": None})


def ev(type_: str, ts: str, **fields: Any) -> dict[str, Any]:
    return stored_event(SOURCE, type_, ts, **fields)


def track(name: str, ts: str, **fields: Any) -> dict[str, Any]:
    return ev("track", ts, event=name, **fields)


async def resolve(engine: AsyncEngine, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """One resolver batch; the profile updates it wrote, taken out of the outbox (only
    these: other tests' rows stay)."""
    await apply_with_retry(engine, list(events), RULES)
    return await outbox_updates(engine, [e["messageId"] for e in events], take=True)


async def feed(
    engine: AsyncEngine, updates: list[dict[str, Any]], settings: Settings = SETTINGS
) -> None:
    """One activation micro-batch, committed."""
    async with engine.begin() as conn:
        await crm_feed.apply_updates(conn, incoming(updates, settings), settings)


async def owner(engine: AsyncEngine, type_: str, value: str) -> uuid.UUID:
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier(type_, value))
    assert pid is not None, f"{type_}:{value} has no profile"
    return pid


async def contact(engine: AsyncEngine, pid: uuid.UUID) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(crm_contacts).where(crm_contacts.c.profile_id == pid))
        ).one_or_none()
    return None if row is None else dict(row._mapping)


async def interactions(engine: AsyncEngine, *pids: uuid.UUID) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(crm_interactions)
            .where(crm_interactions.c.profile_id.in_(pids))
            .order_by(crm_interactions.c.occurred_at, crm_interactions.c.id)
        )
        return [dict(r._mapping) for r in rows]


async def deliveries(engine: AsyncEngine, *pids: uuid.UUID) -> list[dict[str, Any]]:
    keys = [str(p) for p in pids]
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(crm_webhook_deliveries)
            .where(crm_webhook_deliveries.c.payload["profile_id"].astext.in_(keys))
            .order_by(crm_webhook_deliveries.c.id)
        )
        return [dict(r._mapping) for r in rows]


async def snapshot(engine: AsyncEngine, *pids: uuid.UUID) -> Any:
    contacts = [await contact(engine, p) for p in pids]
    return contacts, await interactions(engine, *pids), await deliveries(engine, *pids)


def kinds(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["message_id"], r["kind"]) for r in rows]


def at(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


# --- the feed on Postgres -----------------------------------------------------------------


async def test_scenario_builds_exactly_the_contact_and_its_interactions(
    engine: AsyncEngine,
) -> None:
    anon, email = uid("a"), f"{uid('ada')}@example.com"
    campaign = {"source": "newsletter", "medium": "email", "name": "spring"}
    browse = [
        ev(
            "page",
            "2024-03-01T10:00:00Z",
            anonymousId=anon,
            context={
                "page": {"path": "/pricing", "referrer": "https://x.test"},
                "campaign": campaign,
            },
        ),
        ev("page", "2024-03-01T10:01:00Z", anonymousId=anon, context={"page": {"path": "/blog/a"}}),
        ev("page", "2024-03-01T10:02:00Z", anonymousId=anon, properties={"path": "/Pricing/teams"}),
        ev("page", "2024-03-01T10:03:00Z", anonymousId=anon, properties={"path": "/pricing-old"}),
    ]
    updates = await resolve(engine, *browse)
    await feed(engine, updates)
    pid = await owner(engine, "anonymous_id", anon)
    assert await contact(engine, pid) is None  # anonymous: no contact, history kept
    assert kinds(await interactions(engine, pid)) == [
        (browse[0]["messageId"], "page_viewed"),
        (browse[2]["messageId"], "page_viewed"),
    ]
    assert await deliveries(engine, pid) == []  # nothing the CRM could attach yet

    identify = ev(
        "identify",
        "2024-03-02T09:00:00Z",
        anonymousId=anon,
        traits={
            "email": email.upper(),
            "name": "Ada Lovelace",
            "company": "Analytical Engines",
            "title": "CTO",
            "phone": "+44 20 7946 0958",
        },
    )
    step = await resolve(engine, identify)
    updates += step
    await feed(engine, step)
    c = await contact(engine, pid)
    assert c is not None and c["lifecycle_stage"] == "subscriber"
    # The new contact goes out first, then the history it already had.
    sent = await deliveries(engine, pid)
    assert [(d["kind"], d["payload"]["type"]) for d in sent] == [
        ("contact", "contact.upserted"),
        ("interaction", "interaction.created"),
        ("interaction", "interaction.created"),
    ]
    assert sent[0]["payload"]["created"] is True
    assert sent[0]["payload"]["contact"]["email"] == email

    mail = {"context": {"traits": {"email": email}}}
    props = {"campaign_name": "Spring", "email_subject": "Meet the engine", "email_id": "e-1"}
    later = [
        track("Email Delivered", "2024-03-03T08:00:00Z", properties=props, **mail),
        track("Email Opened", "2024-03-03T08:05:00Z", properties=props, **mail),
        track(
            "email link clicked",
            "2024-03-03T08:06:00Z",
            properties={**props, "link_url": "https://x.test/pricing"},
            **mail,
        ),
        track("Newsletter Read", "2024-03-03T08:07:00Z", **mail),
        track(
            "Form Submitted",
            "2024-03-03T08:10:00Z",
            anonymousId=anon,
            properties={"form_id": "demo"},
        ),
    ]
    step = await resolve(engine, *later)
    updates += step
    await feed(engine, step)
    c = await contact(engine, pid)
    assert c is not None and c["lifecycle_stage"] == "lead"

    products = [{"sku": "AE-1", "price": 99.5, "quantity": 1}]
    orders = [
        track(
            "Order Completed",
            "2024-03-04T12:00:00Z",
            anonymousId=anon,
            properties={
                "order_id": "o-1",
                "revenue": 99.5,
                "currency": "eur",
                "products": products,
            },
        ),
        track(
            "Order Refunded",
            "2024-03-05T12:00:00Z",
            anonymousId=anon,
            properties={"order_id": "o-1", "total": 99.5, "currency": "EUR"},
        ),
        ev(
            "page",
            "2024-03-05T13:00:00Z",
            anonymousId=anon,
            context={"page": {"path": "/demo/book"}},
        ),
    ]
    step = await resolve(engine, *orders)
    updates += step
    await feed(engine, step)

    c = await contact(engine, pid)
    assert c is not None
    assert {f: c[f] for f in contacts.CONTACT_FIELDS} == {
        "email": email,
        "phone": "+442079460958",
        "user_id": None,
        "first_name": "Ada",
        "last_name": "Lovelace",
        "company": "Analytical Engines",
        "job_title": "CTO",
        "lifecycle_stage": "customer",
        "first_touch_source": "newsletter",
        "last_activity_at": at("2024-03-05T13:00:00Z"),
    }
    got = await interactions(engine, pid)
    expected = [
        (browse[0], "page_viewed", {"path": "/pricing", "referrer": "https://x.test"}),
        (browse[2], "page_viewed", {"path": "/Pricing/teams"}),
        (
            later[0],
            "email_delivered",
            {"campaign": "Spring", "subject": "Meet the engine", "email_id": "e-1"},
        ),
        (
            later[1],
            "email_opened",
            {"campaign": "Spring", "subject": "Meet the engine", "email_id": "e-1"},
        ),
        (
            later[2],
            "email_link_clicked",
            {
                "campaign": "Spring",
                "subject": "Meet the engine",
                "email_id": "e-1",
                "link_url": "https://x.test/pricing",
            },
        ),
        (later[4], "form_submitted", {"form_id": "demo"}),
        (
            orders[0],
            "order_completed",
            {"order_id": "o-1", "amount": 99.5, "currency": "EUR", "items": products},
        ),
        (orders[1], "order_refunded", {"order_id": "o-1", "amount": 99.5, "currency": "EUR"}),
        (orders[2], "page_viewed", {"path": "/demo/book"}),
    ]
    assert [
        (i["source_id"], i["message_id"], i["kind"], i["occurred_at"], i["details"]) for i in got
    ] == [
        (SOURCE, e["messageId"], kind, at(e["timestamp"]), details) for e, kind, details in expected
    ]
    sent = await deliveries(engine, pid)
    upserts = [d["payload"]["contact"]["lifecycle_stage"] for d in sent if d["kind"] == "contact"]
    assert upserts == ["subscriber", "lead", "customer"]  # once per batch, as it ends
    announced = [
        d["payload"]["interaction"]["message_id"] for d in sent if d["kind"] == "interaction"
    ]
    assert sorted(announced) == sorted(i["message_id"] for i in got)  # each exactly once
    assert all(d["status"] == "pending" for d in sent)

    # Redelivery: every update again, in one batch, then backwards one at a time.
    before = await snapshot(engine, pid)
    await feed(engine, updates)
    for u in reversed(updates):
        await feed(engine, [u])
    assert await snapshot(engine, pid) == before


async def test_without_a_webhook_url_nothing_is_queued(engine: AsyncEngine) -> None:
    user = uid("u")
    updates = await resolve(
        engine,
        ev("identify", "2024-03-01T10:00:00Z", userId=user, traits={"firstName": "Lin"}),
        track("Signed Up", "2024-03-01T10:01:00Z", userId=user, properties={"type": "google"}),
    )
    await feed(engine, updates, NO_WEBHOOK)
    pid = await owner(engine, "user_id", user)
    c = await contact(engine, pid)
    assert c is not None
    assert (c["user_id"], c["email"], c["first_name"], c["lifecycle_stage"]) == (
        user,
        None,
        "Lin",
        "lead",
    )
    assert kinds(await interactions(engine, pid)) == [
        (updates[0]["events"][1]["messageId"], "signed_up")
    ]
    assert await deliveries(engine, pid) == []


async def test_stage_never_goes_down(engine: AsyncEngine) -> None:
    user = uid("u")
    updates = await resolve(engine, ev("identify", "2024-03-01T10:00:00Z", userId=user))
    await feed(engine, updates)
    pid = await owner(engine, "user_id", user)
    async with engine.begin() as conn:  # as if an order had been unmerged away since
        await conn.execute(
            update(crm_contacts)
            .where(crm_contacts.c.profile_id == pid)
            .values(lifecycle_stage="customer")
        )
    step = await resolve(
        engine, ev("identify", "2024-03-02T10:00:00Z", userId=user, traits={"plan": "x"})
    )
    await feed(engine, step)
    c = await contact(engine, pid)
    assert c is not None and c["lifecycle_stage"] == "customer"
    assert c["last_activity_at"] == at("2024-03-02T10:00:00Z")


@pytest.mark.parametrize("settings", [SETTINGS, NO_WEBHOOK], ids=["webhook", "no-webhook"])
async def test_a_contact_that_lost_its_email_and_user_id_goes(
    engine: AsyncEngine, settings: Settings
) -> None:
    user = uid("u")
    updates = await resolve(
        engine,
        ev("identify", "2024-03-01T10:00:00Z", userId=user, traits={"email": f"{user}@x.io"}),
    )
    await feed(engine, updates, settings)
    pid = await owner(engine, "user_id", user)
    assert await contact(engine, pid) is not None
    async with engine.begin() as conn:  # as if an unmerge had taken both to another profile
        await conn.execute(delete(identities).where(identities.c.profile_id == pid))
    await feed(engine, updates, settings)  # redelivered: re-derived from the profile as it is
    assert await contact(engine, pid) is None
    told = [d["payload"] for d in await deliveries(engine, pid) if d["kind"] == "contact"]
    expected = [("contact.upserted", None), ("contact.deleted", "no_identifier")]
    assert [(t["type"], t.get("reason")) for t in told] == (
        expected if settings.crm_webhook_url else []
    )


async def test_merge_folds_the_merged_away_contact_into_the_canonical_one(
    engine: AsyncEngine,
) -> None:
    a, b = uid("a"), uid("b")
    email_a, email_b = f"{uid('a')}@example.com", f"{uid('b')}@example.com"
    updates = await resolve(
        engine,
        ev(
            "identify",
            "2024-03-01T10:00:00Z",
            anonymousId=a,
            traits={"email": email_a, "name": "Ann"},
        ),
        ev("page", "2024-03-01T10:01:00Z", anonymousId=a, context={"page": {"path": "/pricing"}}),
    )
    updates += await resolve(
        engine,
        ev("identify", "2024-03-02T10:00:00Z", anonymousId=b, traits={"email": email_b}),
        track(
            "Email Opened",
            "2024-03-02T10:05:00Z",
            anonymousId=b,
            properties={"email_subject": "Hi"},
        ),
    )
    await feed(engine, updates)
    first, second = await owner(engine, "anonymous_id", a), await owner(engine, "anonymous_id", b)
    assert first != second
    assert await contact(engine, first) is not None and await contact(engine, second) is not None
    interactions_before = await interactions(engine, first, second)
    sent_before = len(await deliveries(engine, first, second))

    # One event links both: the older profile (first) stays, second is merged into it.
    merge = await resolve(
        engine, ev("identify", "2024-03-03T10:00:00Z", anonymousId=a, traits={"email": email_b})
    )
    assert merge[0]["profile_id"] == str(first) and merge[0]["merged_ids"] == [str(second)]
    updates += merge
    await feed(engine, merge)

    assert await contact(engine, second) is None
    c = await contact(engine, first)
    assert c is not None
    assert (c["email"], c["first_name"]) == (email_b, "Ann")  # the email the traits name now
    moved = await interactions(engine, first, second)
    assert {i["profile_id"] for i in moved} == {first}
    assert [i["id"] for i in moved] == [i["id"] for i in interactions_before]
    new = (await deliveries(engine, first, second))[sent_before:]
    assert [d["payload"] for d in new] == [
        {"type": "contact.merged", "profile_id": str(second), "merged_into": str(first)},
        {
            "type": "contact.upserted",
            "profile_id": str(first),
            "created": False,
            "contact": new[1]["payload"]["contact"],
        },
    ]  # the CRM knew second's interactions: they are moved, not sent again

    # A late update of the merged-away profile lands on the canonical one.
    before = await snapshot(engine, first, second)
    for u in updates:
        await feed(engine, [u])
    assert await snapshot(engine, first, second) == before


async def test_merging_an_anonymous_history_announces_it(engine: AsyncEngine) -> None:
    anon, user = uid("a"), uid("u")
    visit = ev("page", "2024-03-01T10:00:00Z", anonymousId=anon, properties={"path": "/pricing"})
    updates = await resolve(engine, visit)
    signup = track("Signed Up", "2024-03-02T10:01:00Z", userId=user)
    updates += await resolve(engine, ev("identify", "2024-03-02T10:00:00Z", userId=user), signup)
    await feed(engine, updates)
    visitor, person = (
        await owner(engine, "anonymous_id", anon),
        await owner(engine, "user_id", user),
    )
    merge = await resolve(
        engine, ev("identify", "2024-03-03T10:00:00Z", userId=user, anonymousId=anon)
    )
    await feed(engine, merge)
    # The anonymous profile is older, so it is the canonical one: the contact moves to it.
    assert await owner(engine, "user_id", user) == visitor
    assert await contact(engine, person) is None
    c = await contact(engine, visitor)
    assert c is not None and c["user_id"] == user
    assert c["lifecycle_stage"] == "lead"
    assert kinds(await interactions(engine, visitor)) == [
        (visit["messageId"], "page_viewed"),
        (signup["messageId"], "signed_up"),
    ]
    sent = await deliveries(engine, visitor, person)
    assert [(d["payload"]["type"], d["payload"]["profile_id"]) for d in sent] == [
        ("contact.upserted", str(person)),
        ("interaction.created", str(person)),
        ("contact.merged", str(person)),
        ("contact.upserted", str(visitor)),
        ("interaction.created", str(visitor)),
    ]
    # The visit is news to the CRM; the sign-up it has (contact.merged moves it).
    assert sent[4]["payload"]["interaction"]["message_id"] == visit["messageId"]


async def test_tombstone_forgets_the_person(engine: AsyncEngine) -> None:
    anon, email = uid("a"), f"{uid('gone')}@example.com"
    updates = await resolve(
        engine,
        ev("page", "2024-03-01T10:00:00Z", anonymousId=anon, properties={"path": "/pricing"}),
    )
    updates += await resolve(
        engine, track("Email Opened", "2024-03-02T10:00:00Z", context={"traits": {"email": email}})
    )
    updates += await resolve(
        engine, ev("identify", "2024-03-03T10:00:00Z", anonymousId=anon, traits={"email": email})
    )
    await feed(engine, updates)
    pid = await owner(engine, "email", email)
    group = [uuid.UUID(updates[0]["profile_id"]), uuid.UUID(updates[1]["profile_id"])]
    assert await contact(engine, pid) is not None
    assert len(await interactions(engine, *group)) == 2
    assert await deliveries(engine, *group)

    # The API's erasure: delete_group in its transaction, then the tombstone.
    async with engine.begin() as conn:
        ids = await erasure.delete_group(conn, pid, RULES.suppression)
    tombstone = {
        "type": "deleted",
        "profile_id": str(pid),
        "merged_ids": [str(i) for i in ids if i != pid],
    }
    await feed(engine, [tombstone])
    await feed(engine, [tombstone])  # redelivered
    assert await contact(engine, pid) is None
    assert await interactions(engine, *ids) == []
    left = await deliveries(engine, *ids)  # no personal data queued; one "forget them"
    assert [d["payload"] for d in left] == [
        {
            "type": "contact.deleted",
            "profile_id": str(pid),
            "merged_ids": tombstone["merged_ids"],
            "reason": "erased",
        }
    ]
    # Late updates of the deleted person resurrect nothing.
    await feed(engine, updates)
    assert await snapshot(engine, *ids) == ([None] * len(ids), [], left)


async def test_a_lead_event_counts_whatever_whitespace_pads_its_name(engine: AsyncEngine) -> None:
    """The stored events decide who is a lead, trimmed as Python trims (tab, newline, no-break
    space), not only of spaces."""
    users = [uid("u") for _ in range(3)]
    names = ["Form Submitted\t", "\n signed up", "\xa0Form Submitted\u3000"]
    for user, name in zip(users, names, strict=True):
        identify = ev(
            "identify", "2024-03-01T10:00:00Z", userId=user, traits={"email": f"{user}@x.test"}
        )
        await feed(engine, await resolve(engine, identify), NO_WEBHOOK)
        pid = await owner(engine, "user_id", user)
        c = await contact(engine, pid)
        assert c is not None and c["lifecycle_stage"] == "subscriber"
        await feed(
            engine,
            await resolve(engine, track(name, "2024-03-01T10:01:00Z", userId=user)),
            NO_WEBHOOK,
        )
        c = await contact(engine, pid)
        assert c is not None and c["lifecycle_stage"] == "lead", name


async def test_tombstone_alone_removes_contact_and_interactions(engine: AsyncEngine) -> None:
    user = uid("u")
    updates = await resolve(
        engine,
        ev("identify", "2024-03-01T10:00:00Z", userId=user),
        track("Form Submitted", "2024-03-01T10:01:00Z", userId=user),
    )
    await feed(engine, updates, NO_WEBHOOK)
    pid = await owner(engine, "user_id", user)
    assert await contact(engine, pid) is not None and await interactions(engine, pid)
    await feed(engine, [{"type": "deleted", "profile_id": str(pid), "merged_ids": []}], NO_WEBHOOK)
    assert await contact(engine, pid) is None and await interactions(engine, pid) == []


async def test_concurrent_consumers_on_one_person(engine: AsyncEngine) -> None:
    user = uid("u")
    updates = await resolve(
        engine,
        ev(
            "identify", "2024-03-01T10:00:00Z", userId=user, traits={"email": f"{user}@example.com"}
        ),
        track("Signed Up", "2024-03-01T10:01:00Z", userId=user),
        track("Order Completed", "2024-03-01T10:02:00Z", userId=user, properties={"total": 5}),
    )

    async def consume(batch: list[dict[str, Any]]) -> None:
        decoded = incoming(batch, SETTINGS)
        await retrying(engine, lambda conn: crm_feed.apply_updates(conn, decoded, SETTINGS))

    await asyncio.gather(*(consume(updates) for _ in range(4)), consume(updates[::-1]))
    pid = await owner(engine, "user_id", user)
    c = await contact(engine, pid)
    assert c is not None and c["lifecycle_stage"] == "customer"
    assert len(await interactions(engine, pid)) == 2
    sent = await deliveries(engine, pid)
    assert [d["payload"]["type"] for d in sent] == [
        "contact.upserted",
        "interaction.created",
        "interaction.created",
    ]


async def test_an_unmerge_moves_interactions_back_and_splits_the_contact(
    engine: AsyncEngine,
) -> None:
    """identify(u, x1); x2 signs up with email m@; identify(u, x2); unmerge: the sign-up
    goes back to x2's profile with its events, which gets a contact (m@, a lead, its
    history announced, the interaction's id kept), and u's contact loses m@."""
    x1, x2, user, email = uid("x1"), uid("x2"), uid("u"), f"{uid('m')}@example.com"
    await feed(
        engine,
        await resolve(engine, ev("identify", "2024-05-01T00:00:00Z", userId=user, anonymousId=x1)),
    )
    signup = track(
        "Signed Up", "2024-05-02T00:00:00Z", anonymousId=x2, context={"traits": {"email": email}}
    )
    await feed(engine, await resolve(engine, signup))
    await feed(
        engine,
        await resolve(engine, ev("identify", "2024-05-03T00:00:00Z", userId=user, anonymousId=x2)),
    )
    kept = await owner(engine, "user_id", user)
    [moved] = await interactions(engine, kept)
    assert ((await contact(engine, kept)) or {}).get("email") == email

    async with engine.begin() as conn:
        done = await unmerge_last(conn, kept)
    assert done is not None and done.kept == kept
    keys = [str(done.kept), str(done.restored)]
    async with engine.begin() as conn:
        rows = await conn.execute(
            delete(profile_update_outbox)
            .where(profile_update_outbox.c.key.in_(keys))
            .returning(profile_update_outbox.c.payload)
        )
        updates = [orjson.loads(r.payload) for r in rows]
    assert sorted(u["split_from"] for u in updates) == sorted(keys)
    await feed(engine, updates)

    assert await interactions(engine, kept) == []
    [back] = await interactions(engine, done.restored)
    assert (back["id"], back["message_id"]) == (moved["id"], signup["messageId"])
    mine, theirs = await contact(engine, kept), await contact(engine, done.restored)
    assert mine is not None and (mine["email"], mine["user_id"]) == (None, user)
    assert theirs is not None and (theirs["email"], theirs["lifecycle_stage"]) == (email, "lead")
    told = [d["payload"] for d in await deliveries(engine, done.restored)]
    assert [p["type"] for p in told][-2:] == ["contact.upserted", "interaction.created"]
    assert told[-1]["interaction"]["id"] == moved["id"]
    before = await snapshot(engine, kept, done.restored)
    await feed(engine, updates)  # redelivered: nothing changes
    assert await snapshot(engine, kept, done.restored) == before


def test_an_updates_interactions_are_worked_out_as_it_is_decoded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``incoming``, which the consumer runs ahead of the transaction: the interactions of
    the events a salesperson wants, the update kept without its events."""
    pid = uuid.uuid4()
    order = track("Order Completed", "2026-01-02T10:00:00Z", properties={"order_id": "o-1"})
    unreadable = track("Form Submitted", "not a time")
    update = {
        "profile_id": str(pid),
        "events": [
            ev("page", "2026-01-02T09:00:00Z", properties={"path": "/pricing"}),
            ev("page", "2026-01-02T09:01:00Z", properties={"path": "/blog"}),  # not key
            order,
            unreadable,
            {"type": "track", "event": "Order Completed"},  # no source or message id
        ],
    }
    [decoded] = incoming([update], SETTINGS)
    assert [(s, k.kind) for s, _, k in decoded.interactions] == [
        (SOURCE, "page_viewed"),
        (SOURCE, "order_completed"),
    ]
    assert decoded.interactions[1][1] == order["messageId"]
    assert decoded.interactions[1][2].details["order_id"] == "o-1"
    assert decoded.update.events == []
    assert decoded.update.profile_ids() == [pid]
    assert "no CRM interaction for this event" in caplog.text  # logged, the rest kept


def test_a_tombstones_events_make_no_interactions() -> None:
    pid = uuid.uuid4()
    event = ev("page", "2026-01-02T09:00:00Z", properties={"path": "/pricing"})
    [decoded] = incoming([{"type": "deleted", "profile_id": str(pid), "events": [event]}], SETTINGS)
    assert decoded.interactions == []
    assert decoded.update.type == "deleted"
