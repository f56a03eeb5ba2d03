"""The resolver loop on the memory bus and the real Postgres server: events are stored,
records that are not events are parked on the rejected topic, and offsets are committed
only after the database commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.bus.base import BusUnavailable, Record, next_offsets
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import outbox, reads
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import events as events_table
from cdp_stream.profiles.models import profile_update_outbox
from cdp_stream.resolver import consumer
from cdp_stream.resolver.batch import UPDATE_EVENTS_BYTES
from cdp_stream.resolver.consumer import (
    apply_with_retry,
    relay_outbox,
    run_resolver,
    vacuum_outbox,
)
from cdp_stream.settings import Settings
from cdp_stream.topics import Topics
from tests.support import eventually, running_pipeline

SETTINGS = Settings(resolver_poll_timeout_ms=20)
RULES = IdentityRules.from_settings(SETTINGS)


def event(message_id: str, user: str) -> bytes:
    return orjson.dumps(
        {
            "type": "track",
            "event": "E",
            "messageId": message_id,
            "sourceId": "src_consumer_test",
            "userId": user,
            "timestamp": "2026-01-01T00:00:00.000000Z",
            "receivedAt": "2026-01-01T00:00:00.000000Z",
            "channel": "other",
            "context": {},
        }
    )


async def stored(engine: AsyncEngine, message_ids: list[str]) -> int:
    query = select(func.count()).where(events_table.c.message_id.in_(message_ids))
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def test_events_stored_poison_parked_offsets_committed(engine: AsyncEngine) -> None:
    run = uuid.uuid4().hex[:10]
    bus = MemoryBus(default_partitions=2)
    await bus.ensure_topics(Topics().all(2))
    good = [f"{run}-{i}" for i in range(3)]
    await bus.publish(Topics().events, b"k1", event(good[0], f"u-{run}"))
    await bus.publish(Topics().events, b"k1", b"{not json")
    no_id = orjson.loads(event(f"{run}-x", "u"))
    del no_id["userId"]
    await bus.publish(Topics().events, b"k1", orjson.dumps(no_id))
    await bus.publish(Topics().events, b"k1", orjson.dumps([1, 2]))
    for mid in good[1:]:
        await bus.publish(Topics().events, b"k2", event(mid, f"u-{run}"))

    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def all_stored() -> bool:
        return await stored(engine, good) == 3

    assert await eventually(all_stored)
    stop.set()
    await task

    # every record was committed: a new member of the resolver group gets nothing
    after = bus.consumer(Topics().resolver_group, [Topics().events])
    await after.start()
    assert await after.getmany(100, 50) == []
    await after.stop()

    parked = bus.consumer("test-parked", [Topics().rejected])
    await parked.start()
    letters = await parked.getmany(100, 50)
    await parked.commit(next_offsets(letters))
    await parked.stop()
    reasons = [orjson.loads(m.value)["reason"] for m in letters]
    assert len(reasons) == 3
    assert all(r.startswith("not an event at cdp.events[") for r in reasons)
    assert any("userId or an anonymousId" in r for r in reasons)


class FlakyBus(MemoryBus):
    """A memory bus whose first ``failures`` publishes fail as a broker outage would."""

    def __init__(self, failures: int) -> None:
        super().__init__(default_partitions=1)
        self.failures = failures

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BusUnavailable("broker down (test)")
        await super().publish(topic, key, value)


async def test_a_bus_failure_mid_batch_loses_nothing(engine: AsyncEngine) -> None:
    """Parking fails before the batch is stored: the resolver rejoins the group and the
    whole batch comes again from the committed offset."""
    run = uuid.uuid4().hex[:10]
    bus = FlakyBus(failures=2)
    await bus.ensure_topics(Topics().all(1))
    await bus.publish_many(
        [
            Record(Topics().events, b"k", b"garbage"),
            Record(Topics().events, b"k", event(f"{run}-a", f"u-{run}")),
        ]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def stored_once() -> bool:
        return await stored(engine, [f"{run}-a"]) == 1

    assert await eventually(stored_once)
    stop.set()
    await task
    assert bus.failures == 0
    parked = bus.consumer("test-parked", [Topics().rejected])
    await parked.start()
    assert len(await parked.getmany(100, 50)) == 1
    await parked.stop()


async def updates_for(bus: MemoryBus, message_ids: set[str]) -> list[dict[str, Any]]:
    """The profile updates on the bus that carry one of ``message_ids``."""
    reader = bus.consumer(f"test-updates-{uuid.uuid4().hex[:6]}", [Topics().profile_updates])
    await reader.start()
    found = [orjson.loads(m.value) for m in await reader.getmany(100_000, 50)]
    await reader.stop()
    return [u for u in found if {e["messageId"] for e in u["events"]} & message_ids]


async def test_updates_committed_before_a_crash_are_relayed_at_start_up(
    engine: AsyncEngine,
) -> None:
    """The batch committed (outbox rows written) and the process died before publishing:
    the next resolver relays them as it starts, and the outbox keeps none of them."""
    run = uuid.uuid4().hex[:10]
    await apply_with_retry(engine, [orjson.loads(event(f"{run}-a", f"u-{run}"))], RULES)
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def relayed() -> list[dict[str, Any]]:
        return await updates_for(bus, {f"{run}-a"})

    updates = await eventually(relayed)
    stop.set()
    await task
    assert len(updates) == 1
    assert updates[0]["changed_computed"]["event_count"] == 1
    async with engine.connect() as conn:
        left = await conn.scalar(
            select(func.count())
            .select_from(profile_update_outbox)
            .where(profile_update_outbox.c.key == updates[0]["profile_id"])
        )
    assert left == 0


async def test_a_batch_publishes_its_updates_from_memory_as_the_table_would(
    engine: AsyncEngine,
) -> None:
    """The updates a batch wrote, published from memory once it committed: each the
    update a relay of the table makes of its row (its events included), and the rows are
    gone after."""
    run = uuid.uuid4().hex[:10]
    events = [orjson.loads(event(f"{run}-{i}", f"u-{run}-{i % 2}")) for i in range(5)]
    result = await apply_with_retry(engine, events, RULES)
    assert len(result.updates) == 2  # one per profile
    async with engine.connect() as conn:  # what the table's relay would publish
        from_table = await outbox.take_outbox(conn, 10, list(result.updates))
        await conn.rollback()
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    await consumer.publish_written(engine, bus, Topics().profile_updates, result.updates)
    reader = bus.consumer(f"test-{run}", [Topics().profile_updates])
    await reader.start()
    published = [(m.key.decode(), orjson.loads(m.value)) for m in await reader.getmany(100, 100)]
    await reader.stop()
    assert published == [(key, orjson.loads(value)) for key, value in from_table]
    assert sorted(e["messageId"] for _, u in published for e in u["events"]) == sorted(
        e["messageId"] for e in events
    )
    async with engine.connect() as conn:
        assert await outbox.take_outbox(conn, 10, list(result.updates)) == []


async def test_rows_left_in_the_outbox_by_another_process_are_swept(
    engine: AsyncEngine,
) -> None:
    """A request's update whose own publish failed stays in the outbox: a running resolver,
    which publishes its batches' updates from memory, sweeps it up once it is old enough
    (and not before: a younger row may be another resolver's, being published)."""
    run = uuid.uuid4().hex[:10]
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    stop = asyncio.Event()
    settings = Settings(resolver_poll_timeout_ms=20, resolver_outbox_vacuum_s=0.05)
    task = asyncio.create_task(run_resolver(bus, engine, settings, stop))
    await bus.publish(Topics().events, b"k", event(f"{run}-a", f"u-{run}"))
    assert await eventually(lambda: updates_for(bus, {f"{run}-a"}))  # started, relaying
    left = {"profile_id": f"left-{run}", "events": [{"messageId": f"{run}-left"}]}
    async with engine.begin() as conn:
        [young] = await outbox.insert_outbox(conn, [outbox.Update(f"young-{run}", b'{"young": 1}')])
        [old] = await outbox.insert_outbox(conn, [outbox.Update(f"left-{run}", orjson.dumps(left))])
        await conn.execute(
            text(
                "UPDATE profile_update_outbox SET created_at = now() - interval '1 hour'"
                " WHERE id = :id"
            ),
            {"id": old},
        )
    swept = await eventually(lambda: updates_for(bus, {f"{run}-left"}))
    stop.set()
    await task
    assert [u["profile_id"] for u in swept] == [f"left-{run}"]
    async with engine.begin() as conn:
        assert await outbox.take_outbox(conn, 10, [old]) == []
        assert len(await outbox.take_outbox(conn, 10, [young])) == 1  # not its age yet


async def test_a_relay_goes_round_until_a_take_comes_back_short(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five updates, two a take: three takes publish them all, in order, and none is
    left; the short third take ends the relay (no fourth to find nothing)."""
    takes: list[int] = []
    take = outbox.take_outbox

    async def counted(*args: Any) -> list[tuple[str, bytes]]:
        taken = await take(*args)
        takes.append(len(taken))
        return taken

    monkeypatch.setattr(outbox, "take_outbox", counted)
    run = uuid.uuid4().hex[:10]
    keys = [f"{run}-{i}" for i in range(5)]
    async with engine.begin() as conn:
        ids = await outbox.insert_outbox(
            conn, [outbox.Update(k, orjson.dumps({"k": k})) for k in keys]
        )
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    assert await relay_outbox(engine, bus, Topics().profile_updates, limit=2, ids=ids) == 5
    assert takes == [2, 2, 1]
    reader = bus.consumer(f"test-{run}", [Topics().profile_updates])
    await reader.start()
    got = [m.key for m in await reader.getmany(100, 100)]
    await reader.stop()
    assert got == [k.encode() for k in keys]
    async with engine.connect() as conn:
        assert await take(conn, 10, ids) == []


class FailingRelayBus(MemoryBus):
    """Publishing profile updates fails ``failures`` times (the broker went away)."""

    def __init__(self, failures: int) -> None:
        super().__init__(default_partitions=1)
        self.failures = failures

    async def publish_many(self, records: Sequence[Record]) -> None:
        if self.failures and any(r.topic == Topics().profile_updates for r in records):
            self.failures -= 1
            raise BusUnavailable("broker down (test)")
        await super().publish_many(records)


async def test_a_failed_relay_keeps_the_update_for_the_next_one(engine: AsyncEngine) -> None:
    run = uuid.uuid4().hex[:10]
    bus = FailingRelayBus(failures=2)
    await bus.ensure_topics(Topics().all(1))
    await bus.publish(Topics().events, b"k", event(f"{run}-a", f"u-{run}"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def relayed() -> list[dict[str, Any]]:
        return await updates_for(bus, {f"{run}-a"})

    updates = await eventually(relayed)
    stop.set()
    await task
    assert bus.failures == 0
    assert [e["messageId"] for u in updates for e in u["events"]] == [f"{run}-a"]
    assert await stored(engine, [f"{run}-a"]) == 1


async def test_stopping_while_the_database_is_away_ends_the_wait_and_commits_nothing(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = 0

    async def database_away(*args: Any) -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError("database away (test)")

    monkeypatch.setattr("cdp_stream.resolver.consumer.apply_prepared", database_away)
    run = uuid.uuid4().hex[:10]
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    await bus.publish(Topics().events, b"k", event(f"{run}-a", f"u-{run}"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def retried() -> bool:
        return attempts >= 3

    assert await eventually(retried)
    stop.set()
    await asyncio.wait_for(task, 2)  # not "whenever the database is back"
    after = bus.consumer(Topics().resolver_group, [Topics().events])
    await after.start()
    assert len(await after.getmany(100, 50)) == 1  # offsets untouched: it comes again
    await after.stop()


async def test_a_batch_taken_ahead_is_not_committed_before_its_own_transaction(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the first batch waits for the database, the next one is polled and prepared
    (taken ahead); stopping then commits neither: both come again."""
    applied: list[list[str]] = []

    async def database_away(conn: Any, batch: Sequence[Any], rules: Any, wait: bool) -> None:
        applied.append([p.key[1] for p in batch])
        raise ConnectionRefusedError("database away (test)")

    taken: list[int] = []
    real_prepare = consumer.prepare

    def counting_prepare(
        events: Sequence[dict[str, Any]], rules: IdentityRules, texts: Sequence[bytes]
    ) -> Any:
        taken.append(len(events))
        return real_prepare(events, rules, texts)

    monkeypatch.setattr("cdp_stream.resolver.consumer.apply_prepared", database_away)
    monkeypatch.setattr("cdp_stream.resolver.consumer.prepare", counting_prepare)
    run = uuid.uuid4().hex[:10]
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    first, second = f"{run}-a", f"{run}-b"
    for mid in (first, second):
        await bus.publish(Topics().events, b"k", event(mid, f"u-{run}"))
    stop = asyncio.Event()
    one_by_one = Settings(resolver_poll_timeout_ms=20, resolver_batch_size=1)
    task = asyncio.create_task(run_resolver(bus, engine, one_by_one, stop))

    async def second_taken_ahead() -> bool:
        return len(applied) >= 2 and sum(taken) >= 2

    assert await eventually(second_taken_ahead)
    assert {tuple(keys) for keys in applied} == {(first,)}  # the first, retried
    stop.set()
    await asyncio.wait_for(task, 2)
    after = bus.consumer(Topics().resolver_group, [Topics().events])
    await after.start()
    assert [orjson.loads(m.value)["messageId"] for m in await after.getmany(100, 50)] == [
        first,
        second,
    ]
    await after.stop()


async def test_a_profile_of_20000_orders_keeps_small_updates(
    kafka_bootstrap: str, pg_url: str
) -> None:
    """A shop's shared account places 20,000 orders, on the real broker: every profile
    update relayed stays far under Kafka's 1 MiB default message limit (before orders had
    their own table, each carried every order id: 860 KB of computed traits by the end),
    the profile row holds totals only, and every order is counted."""
    user = f"pos-{uuid.uuid4().hex[:8]}"
    orders = [
        orjson.dumps(
            {
                "type": "track",
                "event": "Order Completed",
                "messageId": f"{user}-{i}",
                "sourceId": "src_consumer_test",
                "userId": user,
                "timestamp": "2026-01-01T00:00:00.000000Z",
                "receivedAt": "2026-01-01T00:00:00.000000Z",
                "channel": "purchase",
                "context": {},
                "properties": {"order_id": f"order-{user}-{i:05d}", "revenue": 1.5},
            }
        )
        for i in range(20_000)
    ]
    async with running_pipeline(
        kafka_bootstrap, pg_url, write_key="wk", api_token="tok", loops=[run_resolver]
    ) as runtime:
        topics = runtime.settings.topics
        key = f"user_id:{user}".encode()
        for i in range(0, len(orders), 2000):
            await runtime.bus.publish_many(
                [Record(topics.events, key, value) for value in orders[i : i + 2000]]
            )
        reader = runtime.bus.consumer(f"{topics.resolver_group}-reader", [topics.profile_updates])
        await reader.start()
        sizes: list[int] = []
        counted: list[int] = []

        async def all_counted() -> bool:
            for m in await reader.getmany(10_000, 200):
                update = orjson.loads(m.value)
                sizes.append(len(m.value))
                counted.append(len(update["events"]))
                if (order_count := update["changed_computed"].get("order_count")) is not None:
                    assert order_count <= 20_000
            return sum(counted) == 20_000

        try:
            assert await eventually(all_counted, within_s=120), f"{sum(counted)} relayed"
        finally:
            await reader.stop()
        async with runtime.engine.connect() as conn:
            pid = await repo.profile_for_identifier(conn, Identifier("user_id", user))
            assert pid is not None
            profile = await reads.read_profile(conn, pid)
            row_bytes = await conn.scalar(
                text("SELECT pg_column_size(computed) FROM profiles WHERE id = :id"), {"id": pid}
            )
    assert profile is not None and profile.computed["order_count"] == 20_000
    assert profile.computed["total_revenue"] == 30_000.0
    # the events as Postgres writes them (", " and ": ": ~10% more), and the change itself
    assert max(sizes) <= 1.25 * UPDATE_EVENTS_BYTES < 1024 * 1024
    assert row_bytes is not None and row_bytes < 1024


async def test_relayed_updates_leave_no_bloat(engine: AsyncEngine) -> None:
    """Rounds of write, relay and vacuum reuse the outbox's pages: the table does not grow
    with the number of updates that went through it (it did, between autovacuum passes)."""
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))

    async def one_round() -> int:
        run = uuid.uuid4().hex[:10]
        events = [orjson.loads(event(f"{run}-{i}", f"u-{run}-{i}")) for i in range(1500)]
        await apply_with_retry(engine, events, RULES)
        await relay_outbox(engine, bus, Topics().profile_updates)
        await vacuum_outbox(engine)
        async with engine.connect() as conn:
            size = await conn.scalar(text("SELECT pg_relation_size('profile_update_outbox')"))
        assert isinstance(size, int)
        return size

    first = await one_round()
    later = [await one_round() for _ in range(3)]
    # Without the vacuum each round adds a round's pages (4x the first after 4 rounds); a
    # vacuum held back once by another session's snapshot may leave one round's extra.
    assert min(later) <= first and max(later) <= 2 * first, (first, later)


@pytest.mark.parametrize(
    "clock",
    [
        {"timestamp": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
        {"receivedAt": "9999-12-31T23:59:59-01:00"},  # after 9999 in UTC
    ],
)
async def test_a_time_outside_utc_dates_is_parked_not_a_crash(
    engine: AsyncEngine, clock: dict[str, str]
) -> None:
    """The collector refuses such times; a record that has one anyway (another producer,
    an older collector) is not an event, and the records after it are stored."""
    run = uuid.uuid4().hex[:10]
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    await bus.publish(Topics().events, b"k", orjson.dumps(orjson.loads(event(run, "u")) | clock))
    await bus.publish(Topics().events, b"k", event(f"{run}-after", f"u-{run}"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def after_stored() -> bool:
        return await stored(engine, [f"{run}-after"]) == 1

    assert await eventually(after_stored)
    assert not task.done()
    stop.set()
    await task
    parked = bus.consumer(f"test-parked-{run}", [Topics().rejected])
    await parked.start()
    reasons = [orjson.loads(m.value)["reason"] for m in await parked.getmany(1000, 50)]
    await parked.stop()
    assert any("out of range once converted to UTC" in r for r in reasons)
    assert await stored(engine, [run]) == 0


async def test_an_event_is_stored_as_its_record_carries_it(engine: AsyncEngine) -> None:
    """The record's JSON is stored, not the decoded event encoded again (what the
    collector writes is what orjson would write; a number another producer wrote with
    more digits than a float holds keeps them)."""
    run = uuid.uuid4().hex[:10]
    exact = "0.12345678901234567890123"
    raw = event(run, f"u-{run}")[:-1] + b',"properties":{"amount":' + exact.encode() + b"}}"
    bus = MemoryBus(default_partitions=1)
    await bus.ensure_topics(Topics().all(1))
    await bus.publish(Topics().events, b"k", raw)
    stop = asyncio.Event()
    task = asyncio.create_task(run_resolver(bus, engine, SETTINGS, stop))

    async def is_stored() -> bool:
        return await stored(engine, [run]) == 1

    assert await eventually(is_stored)
    stop.set()
    await task
    amount = events_table.c.payload["properties"]["amount"].astext
    async with engine.connect() as conn:
        kept = await conn.scalar(select(amount).where(events_table.c.message_id == run))
    assert kept == exact
    assert orjson.dumps(orjson.loads(raw)) != raw  # encoded again, it would have lost them
