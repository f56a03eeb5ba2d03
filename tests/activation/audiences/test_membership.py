"""Audience membership on the real Postgres server: real-time updates, time passing,
merges, deletion, redelivery (back-fills: ``test_backfill.py``).

Profiles and events are written by the resolver (``apply_with_retry``); the updates fed
to ``apply_updates`` are the ones it wrote to its outbox, as the activation consumer would
receive them. The database is shared by the session: every test uses its own
identifiers and audiences, and looks only at those.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.audiences import membership as aud
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import erasure
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import audience_changes, audience_members
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings
from tests.activation.audiences.conftest import Make, uid
from tests.support import eventually, outbox_updates, typed

RULES = IdentityRules.from_settings(Settings())
T0 = datetime(2024, 5, 1, tzinfo=UTC)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
PRICING: dict[str, Any] = {
    "and": [
        {
            "event": {
                "type": "page",
                "where": {"path": {"starts_with": "/pricing"}},
                "within": "7d",
            }
        },
        {"computed": "order_count", "eq": 0},
    ]
}


def ev(type_: str, at: datetime, **fields: Any) -> dict[str, Any]:
    ts = at.isoformat().replace("+00:00", "Z")
    return {
        "type": type_,
        "messageId": uid("m-"),
        "sourceId": "src_audience_test",
        "timestamp": ts,
        "receivedAt": ts,
        "channel": "website",
        **fields,
    }


def visit(anon: str, at: datetime, path: str = "/pricing", **fields: Any) -> dict[str, Any]:
    return ev("page", at, anonymousId=anon, properties={"path": path}, **fields)


def order(anon: str, at: datetime) -> dict[str, Any]:
    return ev("track", at, anonymousId=anon, event="Order Completed", properties={"revenue": 9})


async def put(engine: AsyncEngine, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """One resolver batch; returns the profile updates it wrote (its outbox rows)."""
    await apply_with_retry(engine, list(events), RULES)
    return await outbox_updates(engine, [e["messageId"] for e in events])


async def owner(engine: AsyncEngine, type_: str, value: str) -> uuid.UUID:
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier(type_, value))
    assert pid is not None
    return pid


async def apply(engine: AsyncEngine, updates: list[dict[str, Any]], now: datetime) -> None:
    """As the activation consumer: the updates' profiles read first (by the CRM feed)."""
    batch = typed(updates)
    async with engine.begin() as conn:
        read = await repo.canonical_profiles(conn, {i for u in batch for i in u.profile_ids()})
        await aud.apply_updates(conn, batch, now, read)


async def expire(engine: AsyncEngine, now: datetime, since: datetime | None = None) -> int:
    async with engine.begin() as conn:
        return await aud.expire(conn, now, since=since)


async def members(engine: AsyncEngine, audience_id: uuid.UUID) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(audience_members.c.profile_id).where(
                audience_members.c.audience_id == audience_id
            )
        )
        return set(rows.scalars())


async def changes(
    engine: AsyncEngine, audience_id: uuid.UUID
) -> list[tuple[uuid.UUID, str, datetime]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(audience_changes.c.profile_id, audience_changes.c.change, audience_changes.c.at)
            .where(audience_changes.c.audience_id == audience_id)
            .order_by(audience_changes.c.id)
        )
        return [(r.profile_id, r.change, r.at) for r in rows]


# --- real time and time passing ----------------------------------------------------------


async def test_enters_on_an_event_and_exits_when_it_leaves_the_window(
    engine: AsyncEngine, audience: Make
) -> None:
    anon = uid("a-")
    aid = await audience(PRICING)
    updates = await put(engine, visit(anon, T0, "/pricing/teams"))
    pid = await owner(engine, "anonymous_id", anon)
    await apply(engine, updates, T0 + HOUR)
    assert await members(engine, aid) == {pid}
    assert await changes(engine, aid) == [(pid, "enter", T0 + HOUR)]

    await expire(engine, T0 + 7 * DAY - timedelta(seconds=1))
    assert await members(engine, aid) == {pid}
    assert await expire(engine, T0 + 7 * DAY) >= 1  # the visit is exactly 7 days old
    assert await members(engine, aid) == set()
    assert await changes(engine, aid) == [(pid, "enter", T0 + HOUR), (pid, "exit", T0 + 7 * DAY)]
    await expire(engine, T0 + 30 * DAY)
    assert len(await changes(engine, aid)) == 2


async def test_named_events_count_however_the_name_is_written(
    engine: AsyncEngine, audience: Make
) -> None:
    """Only the rules' event names are read from the timeline: the same name in another
    case, with spaces around it or with SQL wildcards in it still counts; a longer name
    that contains it does not."""
    name = uid("Cart_Add 100% ")
    aid = await audience(
        {"event": {"type": "track", "name": name, "within": "7d", "count": {"gte": 2}}}
    )
    counted, near, other = uid("a-"), uid("a-"), uid("a-")
    updates = await put(
        engine,
        ev("track", T0, anonymousId=counted, event=f"  {name.upper()}\t"),
        ev("track", T0 + HOUR, anonymousId=counted, event=name.lower()),
        ev("track", T0, anonymousId=near, event=name),
        ev("track", T0 + HOUR, anonymousId=near, event=f"{name} twice"),
        ev("track", T0, anonymousId=other, event=name.replace("%", "x")),
        ev("track", T0 + HOUR, anonymousId=other, event=name.replace("_", "x")),
    )
    await apply(engine, updates, T0 + 2 * HOUR)
    assert await members(engine, aid) == {await owner(engine, "anonymous_id", counted)}


async def test_a_named_event_padded_with_any_whitespace_leaves_its_window(
    engine: AsyncEngine, audience: Make
) -> None:
    """Expiry finds the events that left a window by name as the rule matches them: a
    name sent with a tab or a newline around it expires like any other."""
    name = uid("Trial Started ")
    aid = await audience({"event": {"type": "track", "name": name, "within": "7d"}})
    anon = uid("a-")
    updates = await put(engine, ev("track", T0, anonymousId=anon, event=f"\t{name}\n"))
    pid = await owner(engine, "anonymous_id", anon)
    await apply(engine, updates, T0 + HOUR)
    assert await members(engine, aid) == {pid}
    assert await expire(engine, T0 + 7 * DAY) >= 1
    assert await members(engine, aid) == set()


async def test_event_properties_are_read_only_for_rules_that_look_into_them(
    engine: AsyncEngine, audience: Make
) -> None:
    named = uid("Plan Chosen ")
    aid = await audience(
        {
            "event": {
                "type": "track",
                "name": named,
                "where": {"plan": {"eq": "pro"}},
                "within": "7d",
            }
        }
    )
    pro, free = uid("a-"), uid("a-")
    updates = await put(
        engine,
        ev("track", T0, anonymousId=pro, event=named, properties={"plan": "pro"}),
        ev("track", T0, anonymousId=free, event=named, properties={"plan": "free"}),
    )
    await apply(engine, updates, T0 + HOUR)
    assert await members(engine, aid) == {await owner(engine, "anonymous_id", pro)}


async def test_expiry_with_since_looks_at_what_crossed_since_the_last_run(
    engine: AsyncEngine, audience: Make
) -> None:
    anon = uid("a-")
    aid = await audience(PRICING)
    await apply(engine, await put(engine, visit(anon, T0)), T0)
    second = await put(engine, visit(anon, T0 + 2 * DAY))
    await apply(engine, second, T0 + 2 * DAY)
    await expire(engine, T0 + 8 * DAY, since=T0 + 6 * DAY)  # the first visit left; not the 2nd
    assert len(await members(engine, aid)) == 1
    await expire(engine, T0 + 9 * DAY, since=T0 + 8 * DAY)
    assert await members(engine, aid) == set()
    assert [c for _, c, _ in await changes(engine, aid)] == ["enter", "exit"]


async def test_an_order_exits_the_never_ordered_audience(
    engine: AsyncEngine, audience: Make
) -> None:
    anon = uid("a-")
    aid = await audience(PRICING)
    visited = await put(engine, visit(anon, T0))
    await apply(engine, visited, T0)
    ordered = await put(engine, order(anon, T0 + HOUR))
    assert ordered[0]["changed_computed"]["order_count"] == 1
    await apply(engine, ordered, T0 + HOUR)
    pid = await owner(engine, "anonymous_id", anon)
    assert await members(engine, aid) == set()
    assert await changes(engine, aid) == [(pid, "enter", T0), (pid, "exit", T0 + HOUR)]


async def test_time_admits_a_did_not_rule_when_the_event_leaves(
    engine: AsyncEngine, audience: Make
) -> None:
    run = uid()
    rule = {
        "and": [
            {"trait": "run", "eq": run},
            {"not": {"event": {"type": "page", "within": "7d"}}},
        ]
    }
    aid = await audience(rule)
    anon = uid("a-")
    updates = await put(engine, visit(anon, T0, context={"traits": {"run": run}}))
    await apply(engine, updates, T0 + HOUR)
    assert await members(engine, aid) == set()
    await expire(engine, T0 + 7 * DAY)  # no new event: time alone admits them
    pid = await owner(engine, "anonymous_id", anon)
    assert await members(engine, aid) == {pid}
    assert await changes(engine, aid) == [(pid, "enter", T0 + 7 * DAY)]


async def test_run_expiry_drops_members_as_the_clock_passes(
    engine: AsyncEngine, audience: Make
) -> None:
    name = uid("Ping ")
    aid = await audience({"event": {"type": "track", "name": name, "within": "1s"}})
    anon = uid("a-")
    now = datetime.now(UTC)
    await apply(engine, await put(engine, ev("track", now, anonymousId=anon, event=name)), now)
    assert len(await members(engine, aid)) == 1
    stop = asyncio.Event()
    task = asyncio.create_task(aud.run_expiry(engine, stop, 0.1))
    try:
        for _ in range(100):
            if not await members(engine, aid):
                break
            await asyncio.sleep(0.1)
        assert await members(engine, aid) == set()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert [c for _, c, _ in await changes(engine, aid)] == ["enter", "exit"]


# --- redelivery, merges, deletion --------------------------------------------------------


async def test_redelivered_and_stale_updates_change_nothing(
    engine: AsyncEngine, audience: Make
) -> None:
    anon = uid("a-")
    aid = await audience(PRICING)
    visited = await put(engine, visit(anon, T0)) + await put(engine, visit(anon, T0 + HOUR))
    assert len(visited) == 2
    await apply(engine, visited + visited, T0 + HOUR)
    await apply(engine, visited, T0 + 2 * HOUR)
    await apply(engine, visited[:1], T0 + 3 * HOUR)
    assert len(await changes(engine, aid)) == 1
    await apply(engine, await put(engine, order(anon, T0 + 4 * HOUR)), T0 + 4 * HOUR)
    await apply(engine, visited, T0 + 5 * HOUR)  # old news: the profile has ordered since
    assert await members(engine, aid) == set()
    assert [c for _, c, _ in await changes(engine, aid)] == ["enter", "exit"]


async def test_merged_profiles_leave_and_the_canonical_one_stays(
    engine: AsyncEngine, audience: Make
) -> None:
    anon, email, run = uid("a-"), f"{uid('e-')}@example.com", uid()
    aid = await audience(PRICING)
    # the merged-away row keeps its last traits: only its being merged can take it out
    by_trait = await audience({"trait": "run", "eq": run})
    first = await put(engine, visit(anon, T0, context={"traits": {"run": run}}))
    second = await put(
        engine,
        visit(uid("b-"), T0 + HOUR, context={"traits": {"email": email, "run": run}}),
    )
    await apply(engine, first + second, T0 + HOUR)
    kept, merged = await owner(engine, "anonymous_id", anon), await owner(engine, "email", email)
    assert kept != merged
    assert await members(engine, aid) == await members(engine, by_trait) == {kept, merged}
    linked = await put(
        engine, ev("identify", T0 + 2 * HOUR, anonymousId=anon, traits={"email": email})
    )
    assert linked[0]["merged_ids"] == [str(merged)]
    await apply(engine, linked, T0 + 2 * HOUR)
    await apply(engine, linked + second, T0 + 3 * HOUR)  # redelivered, and a stale one
    for audience_id in (aid, by_trait):
        assert await members(engine, audience_id) == {kept}
        assert sorted((p == kept, c) for p, c, _ in await changes(engine, audience_id)) == [
            (False, "enter"),
            (False, "exit"),
            (True, "enter"),
        ]


async def test_a_deleted_person_leaves_without_their_id_being_written_back(
    engine: AsyncEngine, audience: Make
) -> None:
    anon = uid("a-")
    aid = await audience(PRICING)
    await apply(engine, await put(engine, visit(anon, T0)), T0)
    pid = await owner(engine, "anonymous_id", anon)
    async with engine.begin() as conn:
        erased = await erasure.delete_group(conn, pid, RULES.suppression)
    tombstone = {"type": "deleted", "profile_id": str(pid), "merged_ids": []}
    await apply(engine, [tombstone, tombstone], T0 + DAY)
    assert erased == [pid]
    assert await members(engine, aid) == set()
    assert await changes(engine, aid) == []  # erased by delete_group, not recreated


async def test_unknown_and_malformed_ids_are_skipped(engine: AsyncEngine, audience: Make) -> None:
    await audience(PRICING)
    await apply(
        engine,
        [{"profile_id": "not-a-uuid", "merged_ids": ["nope"]}, {"profile_id": str(uuid.uuid4())}],
        T0,
    )


async def test_a_member_leaves_within_the_documented_expiry_interval(
    engine: AsyncEngine, audience: Make
) -> None:
    """At the default ``CDP_AUDIENCE_EXPIRY_INTERVAL_S`` (what the README states), a member
    whose only event leaves a 1 s window is gone within that interval of it leaving."""
    interval = Settings().audience_expiry_interval_s
    assert interval == 5.0  # the README's figure
    name = uid("Pulse ")
    aid = await audience({"event": {"type": "track", "name": name, "within": "1s"}})
    anon, now = uid("a-"), datetime.now(UTC)
    await apply(engine, await put(engine, ev("track", now, anonymousId=anon, event=name)), now)
    assert len(await members(engine, aid)) == 1
    stop = asyncio.Event()
    task = asyncio.create_task(aud.run_expiry(engine, stop, interval))
    try:

        async def gone() -> bool:
            return not await members(engine, aid)

        assert await eventually(gone, within_s=3 * interval, interval=0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    [(_, change, at)] = (await changes(engine, aid))[1:]
    left_window = now + timedelta(seconds=1)
    assert change == "exit"
    assert at - left_window <= timedelta(seconds=interval + 0.5)  # + a run's own time
