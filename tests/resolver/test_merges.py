"""Merges, refused links and unmerge, by apply_batch on the real Postgres server."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import reads
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import (
    events,
    identities,
    identity_refusals,
    profile_merges,
    profiles,
)
from cdp_stream.resolver import repository as resolver_repo
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.resolver.unmerge import unmerge_last
from cdp_stream.settings import Settings
from tests.resolver.test_batch import ev

RULES = IdentityRules.from_settings(Settings())


def uid() -> str:
    return uuid.uuid4().hex[:10]


async def apply(engine: AsyncEngine, *events: dict[str, Any]) -> None:
    await apply_with_retry(engine, list(events), RULES)


async def owner(engine: AsyncEngine, type_: str, value: str) -> uuid.UUID:
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier(type_, value))
    assert pid is not None, f"{type_}:{value} has no profile"
    return pid


async def profile(engine: AsyncEngine, pid: uuid.UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        found = await reads.read_profile(conn, pid)
    assert found is not None
    return asdict(found)


async def test_sign_in_merges_anonymous_and_email_profiles_into_the_oldest(
    engine: AsyncEngine,
) -> None:
    run = uid()
    anon, email, user = f"a-{run}", f"ada-{run}@example.com", f"u-{run}"
    await apply(engine, ev(f"{run}-1", "2024-01-01T00:00:00Z", anonymousId=anon, type="page"))
    await apply(
        engine,
        ev(
            f"{run}-2",
            "2024-01-02T00:00:00Z",
            type="track",
            event="Email Opened",
            anonymousId="undefined",
            context={"traits": {"email": email.upper()}},
        ),
    )
    first, second = await owner(engine, "anonymous_id", anon), await owner(engine, "email", email)
    assert first != second
    await apply(
        engine,
        ev(
            f"{run}-3",
            "2024-01-03T00:00:00Z",
            userId=user,
            anonymousId=anon,
            traits={"email": email, "plan": "pro"},
        ),
    )
    canonical = await owner(engine, "user_id", user)
    assert canonical == first  # the oldest profile stays
    assert await owner(engine, "email", email) == canonical
    merged = await profile(engine, canonical)
    assert merged["merged_from"] == [str(second)]
    assert {(i["type"], i["value"]) for i in merged["identities"]} == {
        ("anonymous_id", anon),
        ("email", email),
        ("user_id", user),
    }
    assert merged["traits"] == {"email": email, "plan": "pro"}
    assert merged["computed"]["event_count"] == 3
    assert merged["computed"]["email_opens"] == 1
    assert merged["computed"]["page_views"] == 1
    async with engine.connect() as conn:
        assert await repo.canonical_id(conn, second) == canonical
        log = (
            await conn.execute(select(profile_merges).where(profile_merges.c.merged_id == second))
        ).one()
        events = await resolver_repo.event_payloads(conn, canonical)
    assert (log.canonical_id, log.message_id) == (canonical, f"{run}-3")
    assert [e["messageId"] for e in events] == [f"{run}-1", f"{run}-2", f"{run}-3"]


async def test_a_shared_device_never_merges_two_user_ids(engine: AsyncEngine) -> None:
    run = uid()
    device = f"tablet-{run}"
    await apply(
        engine,
        ev(
            f"{run}-1",
            "2024-01-01T00:00:00Z",
            userId=f"u1-{run}",
            anonymousId=device,
            traits={"name": "Ada"},
        ),
    )
    await apply(
        engine,
        ev(
            f"{run}-2",
            "2024-01-02T00:00:00Z",
            userId=f"u2-{run}",
            anonymousId=device,
            traits={"name": "Bob"},
        ),
    )
    ada, bob = (
        await owner(engine, "user_id", f"u1-{run}"),
        await owner(engine, "user_id", f"u2-{run}"),
    )
    assert ada != bob
    assert await owner(engine, "anonymous_id", device) == ada  # first come
    assert (await profile(engine, bob))["traits"] == {"name": "Bob"}  # the event went to u2
    async with engine.connect() as conn:
        refusal = (
            await conn.execute(
                select(identity_refusals).where(identity_refusals.c.message_id == f"{run}-2")
            )
        ).one()
    assert (refusal.profile_id, refusal.other_profile_id) == (bob, ada)
    assert (refusal.type, refusal.value) == ("anonymous_id", device)
    assert "at most 1 user_id" in refusal.reason


async def test_limits_cap_claims_too(engine: AsyncEngine) -> None:
    run = uid()
    rules = IdentityRules.from_settings(Settings(identity_limits={"user_id": 1, "email": 2}))
    events = [
        ev(
            f"{run}-{i}",
            f"2024-01-0{i + 1}T00:00:00Z",
            userId=f"u-{run}",
            traits={"email": f"e{i}-{run}@x.io"},
        )
        for i in range(3)
    ]
    await apply_with_retry(engine, events, rules)
    pid = await owner(engine, "user_id", f"u-{run}")
    emails = [
        i["value"] for i in (await profile(engine, pid))["identities"] if i["type"] == "email"
    ]
    assert emails == [f"e0-{run}@x.io", f"e1-{run}@x.io"]
    async with engine.connect() as conn:
        refused = (
            (
                await conn.execute(
                    select(identity_refusals.c.value).where(identity_refusals.c.profile_id == pid)
                )
            )
            .scalars()
            .all()
        )
    assert refused == [f"e2-{run}@x.io"]


async def test_a_profile_over_a_lowered_limit_takes_no_more_links(engine: AsyncEngine) -> None:
    """Limits lowered after a profile grew past them: events by its identifiers are not
    linked to it any more (each link refused and recorded), event after event of a batch,
    and it keeps what it had."""
    run = uid()
    user, emails = f"u-{run}", [f"e{i}-{run}@x.io" for i in range(2)]
    wide = IdentityRules.from_settings(Settings(identity_limits={"email": 2}))
    grown = [
        ev(f"{run}-{i}", "2024-01-01T00:00:00Z", userId=user, traits={"email": e})
        for i, e in enumerate(emails)
    ]
    await apply_with_retry(engine, grown, wide)
    pid = await owner(engine, "user_id", user)
    narrow = IdentityRules.from_settings(Settings(identity_limits={"email": 1}))
    later = [
        ev(f"{run}-later-{i}", "2024-01-02T00:00:00Z", anonymousId="null", traits={"email": e})
        for i, e in enumerate(emails + emails)
    ]
    await apply_with_retry(engine, later, narrow)
    kept = {(i["type"], i["value"]) for i in (await profile(engine, pid))["identities"]}
    assert kept == {("user_id", user), *(("email", e) for e in emails)}
    async with engine.connect() as conn:
        refused = (
            await conn.execute(
                select(identity_refusals.c.other_profile_id, identity_refusals.c.reason).where(
                    identity_refusals.c.message_id.like(f"{run}-later-%")
                )
            )
        ).all()
        on_it = await conn.scalar(
            select(func.count())
            .select_from(events)
            .where(events.c.profile_id == pid, events.c.message_id.like(f"{run}-later-%"))
        )
    assert len(refused) == 4
    assert all(other == pid and "at most 1 email" in why for other, why in refused)
    assert on_it == 0


async def test_concurrent_merges_leave_one_profile_per_person(engine: AsyncEngine) -> None:
    """Each person's anonymous, email and user events in separate concurrent batches: every
    identity ends on one canonical profile, whatever order the batches commit in."""
    run, people = uid(), range(15)

    def history(p: int) -> list[dict[str, Any]]:
        a, e, u = f"a{p}-{run}", f"e{p}-{run}@x.io", f"u{p}-{run}"
        return [
            ev(f"{run}-{p}-1", "2024-01-01T00:00:00Z", anonymousId=a),
            ev(
                f"{run}-{p}-2",
                "2024-01-02T00:00:00Z",
                anonymousId="null",
                context={"traits": {"email": e}},
            ),
            ev(f"{run}-{p}-3", "2024-01-03T00:00:00Z", userId=u, anonymousId=a),
            ev(f"{run}-{p}-4", "2024-01-04T00:00:00Z", userId=u, traits={"email": e}),
        ]

    batches: list[list[dict[str, Any]]] = [[] for _ in range(4)]
    for p in people:
        for i, event in enumerate(history(p)):
            batches[(i + p) % 4].append(event)
    await asyncio.gather(*(apply(engine, *b) for b in batches))
    for p in people:
        pid = await owner(engine, "user_id", f"u{p}-{run}")
        assert await owner(engine, "email", f"e{p}-{run}@x.io") == pid
        assert await owner(engine, "anonymous_id", f"a{p}-{run}") == pid
        shown = await profile(engine, pid)
        assert shown["computed"]["event_count"] == 4
    async with engine.connect() as conn:
        dangling = await conn.scalar(
            select(identities.c.value)
            .join(profiles, profiles.c.id == identities.c.profile_id)
            .where(identities.c.value.like(f"%{run}%"), profiles.c.merged_into.is_not(None))
        )
    assert dangling is None  # no identity points at a merged-away profile


async def test_unmerge_restores_both_profiles(engine: AsyncEngine) -> None:
    run = uid()
    a, user = f"a-{run}", f"u-{run}"
    await apply(
        engine,
        ev(
            f"{run}-1",
            "2024-01-01T00:00:00Z",
            anonymousId=a,
            type="page",
            context={"traits": {"city": "Oslo"}},
        ),
    )
    await apply(engine, ev(f"{run}-2", "2024-01-02T00:00:00Z", userId=user, traits={"plan": "pro"}))
    before_anon = await profile(engine, await owner(engine, "anonymous_id", a))
    before_user = await profile(engine, await owner(engine, "user_id", user))
    await apply(
        engine,
        ev(
            f"{run}-3",
            "2024-01-03T00:00:00Z",
            userId=user,
            anonymousId=a,
            type="track",
            event="Signed In",
        ),
    )
    canonical = await owner(engine, "user_id", user)
    assert canonical == uuid.UUID(before_anon["id"])  # older
    async with engine.begin() as conn:
        done = await unmerge_last(conn, canonical)
    assert done is not None
    kept, restored = await profile(engine, done.kept), await profile(engine, done.restored)
    assert kept["id"] == before_anon["id"] and restored["id"] == before_user["id"]
    assert kept["identities"] == before_anon["identities"]
    assert kept["traits"] == {"city": "Oslo"}
    assert restored["traits"] == {"plan": "pro"}
    assert kept["merged_from"] == restored["merged_from"] == []
    async with engine.connect() as conn:
        kept_events = [e["messageId"] for e in await resolver_repo.event_payloads(conn, done.kept)]
        restored_events = [
            e["messageId"] for e in await resolver_repo.event_payloads(conn, done.restored)
        ]
    # the merging event attached to the group's canonical profile: it stays there
    assert kept_events == [f"{run}-1", f"{run}-3"]
    assert restored_events == [f"{run}-2"]
    assert restored["computed"]["event_count"] == 1
    assert kept["computed"]["event_count"] == 2
    async with engine.begin() as conn:
        assert await unmerge_last(conn, canonical) is None  # nothing left to undo


async def test_an_unmerge_finds_the_groups_rows_by_index(engine: AsyncEngine) -> None:
    """Its identities, events and orders are found through ``profile_id``'s indexes, not
    by reading the whole tables (which grow with every event) while it holds the group."""
    run = uid()
    a, user = f"a-{run}", f"u-{run}"
    order = {"order_id": f"o-{run}", "total": 5}
    purchase = {"type": "track", "event": "Order Completed", "properties": order}
    history = [
        ev(f"{run}-1", "2024-01-01T00:00:00Z", anonymousId=a, type="page"),
        ev(f"{run}-2", "2024-01-02T00:00:00Z", userId=user, **purchase),
        ev(f"{run}-3", "2024-01-03T00:00:00Z", userId=user, anonymousId=a),
    ]
    for event in history:  # a batch each: the third merges the first two's profiles
        await apply(engine, event)
    canonical = await owner(engine, "user_id", user)
    # this backend's table scans not yet reported (its transactions' since the last report)
    scans = text(
        "SELECT relname, seq_scan FROM pg_stat_xact_user_tables"
        " WHERE relname IN ('identities', 'events', 'orders')"
    )
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL enable_seqscan = off"))  # an index, if any fits
        before = dict((await conn.execute(scans)).all())
        assert await unmerge_last(conn, canonical) is not None
        after = dict((await conn.execute(scans)).all())
    assert after == before


async def test_an_unmerged_pair_stays_split_until_the_split_is_removed(
    engine: AsyncEngine,
) -> None:
    """The split binds the two groups whatever they merge with later: a link between them
    is refused and recorded (with the split's reason), the event going to the first
    identifier's profile; once the split is removed, the next link merges them."""
    run = uid()
    a, b, c, user = f"a-{run}", f"b-{run}", f"c-{run}", f"u-{run}"
    await apply(engine, ev(f"{run}-1", "2024-01-01T00:00:00Z", anonymousId=a, type="page"))
    await apply(engine, ev(f"{run}-2", "2024-01-02T00:00:00Z", anonymousId=b, type="page"))
    await apply(engine, ev(f"{run}-3", "2024-01-03T00:00:00Z", userId=user, anonymousId=a))
    await apply(engine, ev(f"{run}-4", "2024-01-04T00:00:00Z", userId=user, anonymousId=b))
    async with engine.begin() as conn:
        done = await unmerge_last(conn, await owner(engine, "user_id", user))
    assert done is not None
    kept, restored = done.kept, done.restored
    assert await owner(engine, "anonymous_id", b) == restored

    # the same link again, and through a third profile merged into the kept side later
    await apply(engine, ev(f"{run}-5", "2024-01-05T00:00:00Z", userId=user, anonymousId=b))
    await apply(engine, ev(f"{run}-6", "2024-01-06T00:00:00Z", anonymousId=c, type="page"))
    await apply(engine, ev(f"{run}-7", "2024-01-07T00:00:00Z", userId=user, anonymousId=c))
    await apply(
        engine,
        ev(f"{run}-8", "2024-01-08T00:00:00Z", anonymousId=c, type="track", event="X"),
        ev(
            f"{run}-9",
            "2024-01-09T00:00:00Z",
            anonymousId=c,
            type="track",
            event="Y",
            context={"device": {"id": f"d-{run}"}},
        ),
        ev(
            f"{run}-10",
            "2024-01-10T00:00:00Z",
            anonymousId=b,
            context={"device": {"id": f"d-{run}"}},
        ),
    )
    assert await owner(engine, "anonymous_id", c) == kept
    assert await owner(engine, "anonymous_id", b) == restored
    async with engine.connect() as conn:
        log = await reads.read_merges(conn, kept)
        kept_events = [e["messageId"] for e in await resolver_repo.event_payloads(conn, kept)]
    refused = [(r.message_id, r.type, r.value) for r in log.refusals]
    assert (f"{run}-5", "anonymous_id", b) in refused
    assert all("split" in r.reason for r in log.refusals)
    assert f"{run}-5" in kept_events  # the event went to its first identifier's profile
    [split] = log.splits
    assert (split.profile_id, split.other_canonical_id) == (str(kept), str(restored))
    async with engine.connect() as conn:
        other_side = await reads.read_merges(conn, restored)
    refused_there = {(r.message_id, r.value) for r in other_side.refusals}
    assert (f"{run}-10", f"d-{run}") in refused_there  # d-run is the kept side's now

    async with engine.begin() as conn:
        assert await resolver_repo.remove_splits(conn, restored, kept) == 1
        assert await resolver_repo.remove_splits(conn, restored, kept) == 0
    await apply(engine, ev(f"{run}-11", "2024-01-11T00:00:00Z", userId=user, anonymousId=b))
    assert await owner(engine, "anonymous_id", b) == await owner(engine, "user_id", user) == kept
