"""Poison records on the real broker and server: a batch holding one record its consumer
can never apply is bisected, the good records are applied, the poison one is on
``cdp.dead-letters`` with its reason and counted (``cdp_dead_letters_total``), and the
consumer goes on.
Once for the resolver, once for activation, once for a profile update too large for Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select, text

from cdp_stream.activation.consumer import run_activation
from cdp_stream.app import Runtime
from cdp_stream.bus.base import Record, next_offsets
from cdp_stream.identity import IdentityRules
from cdp_stream.metrics import REGISTRY
from cdp_stream.profiles import dead_letters, outbox
from cdp_stream.profiles.models import crm_contacts
from cdp_stream.profiles.models import events as events_table
from cdp_stream.resolver.consumer import apply_with_retry, relay_outbox, run_resolver
from cdp_stream.settings import Settings
from tests.support import eventually, stored_event, uid

RULES = IdentityRules.from_settings(Settings())
TS = "2026-01-01T00:00:00.000000Z"


@pytest.fixture
async def runtime(kafka_bootstrap: str, pg_url: str) -> AsyncIterator[Runtime]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=pg_url,
        bootstrap_write_key=uid("wk"),
        resolver_poll_timeout_ms=50,
        topic_partitions=1,  # the test's records in one batch
        topic_namespace=f"test-{uid()}.",
    )
    runtime = await Runtime.start(settings, "test-poison")
    yield runtime
    await runtime.stop()


def event(message_id: str, user: str, **fields: Any) -> dict[str, Any]:
    """An event as the collector publishes it to cdp.events."""
    fields = {"context": {}, "messageId": message_id, "userId": user, **fields}
    return stored_event("src_poison_test", "identify", TS, channel="other", **fields)


async def parked_count(runtime: Runtime, consumer: str) -> int:
    async with runtime.engine.connect() as conn:
        return (await dead_letters.counts(conn)).get(consumer, 0)


def _counted(consumer: str) -> float:
    return REGISTRY.get_sample_value("cdp_dead_letters_total", {"consumer": consumer}) or 0.0


async def letters(runtime: Runtime, marker: str) -> list[dict[str, Any]]:
    """The dead letters that mention ``marker`` (read by a fresh group)."""
    consumer = runtime.bus.consumer(f"test-dead-{uid()}", [runtime.settings.topics.dead_letters])
    await consumer.start()
    found: list[dict[str, Any]] = []

    async def probe() -> bool:
        messages = await consumer.getmany(1000, 200)
        await consumer.commit(next_offsets(messages))
        found.extend(d for m in messages if marker in (d := orjson.loads(m.value))["value"])
        return bool(found)

    try:
        await eventually(probe)
    finally:
        await consumer.stop()
    return found


async def running(
    runtime: Runtime, loop: Callable[..., Awaitable[None]], until: Callable[[], Awaitable[bool]]
) -> None:
    """Run a consumer loop until ``until`` holds; it must not have ended on its own."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop(runtime.bus, runtime.engine, runtime.settings, stop))
    try:
        assert await eventually(until, within_s=30)
        assert not task.done(), "the consumer ended on its own"
    finally:
        stop.set()
        await task


async def test_a_poison_event_is_parked_and_the_resolver_goes_on(runtime: Runtime) -> None:
    run, topic = uid(), runtime.settings.topics.events
    good = [f"{run}-{i}" for i in range(4)]
    poison = event(f"{run}-poison", f"u-{run}", traits={"s": "a\u0000b"})  # jsonb refuses
    batch = [event(good[0], f"u-{run}"), event(good[1], f"v-{run}"), poison]
    batch += [event(good[2], f"w-{run}"), event(good[3], f"x-{run}")]
    await runtime.bus.publish_many(
        [_record(topic, e) for e in batch]  # one partition: one batch
    )
    before = await parked_count(runtime, "resolver")
    counted = _counted("resolver")

    async def stored() -> bool:
        query = select(func.count()).where(events_table.c.message_id.in_(good))
        async with runtime.engine.connect() as conn:
            return (await conn.execute(query)).scalar_one() == len(good)

    async def continues() -> bool:  # an event after the poison one is stored too
        return await stored() and await _stored(runtime, f"{run}-after")

    await runtime.bus.publish(topic, b"k", orjson.dumps(event(f"{run}-after", f"y-{run}")))
    await running(runtime, run_resolver, continues)

    [letter] = await letters(runtime, f"{run}-poison")
    assert letter["consumer"] == "resolver"
    assert letter["origin"].startswith(f"{topic}[0]@")
    assert "Unicode" in letter["reason"] or "\\u0000" in letter["reason"]
    assert orjson.loads(letter["value"]) == poison
    assert await parked_count(runtime, "resolver") == before + 1
    assert _counted("resolver") == counted + 1
    assert not await _stored(runtime, f"{run}-poison")


async def test_a_poison_update_is_parked_and_activation_goes_on(runtime: Runtime) -> None:
    run, topic = uid(), runtime.settings.topics.profile_updates
    emails = [f"poison-{run}-{i}@example.com" for i in range(3)]
    people = [
        event(f"{run}-{i}", f"u-{run}-{i}", traits={"email": e}) for i, e in enumerate(emails)
    ]
    await apply_with_retry(runtime.engine, people[:2], RULES)
    await relay_outbox(runtime.engine, runtime.bus, topic)
    # merged_ids that are not a list: what no resolver writes, and what broke the loop;
    # an update of a contract version this code does not know; bytes that are not JSON
    poison = {"profile_id": str(uuid.uuid4()), "merged_ids": 5, "marker": f"{run}-poison"}
    newer = {"version": 2, "profile_id": str(uuid.uuid4()), "marker": f"{run}-newer"}
    await runtime.bus.publish(topic, b"k", orjson.dumps(poison))
    await runtime.bus.publish(topic, b"k", orjson.dumps(newer))
    await runtime.bus.publish(topic, b"k", f'{{"profile_id": "{run}-garbled'.encode())
    await apply_with_retry(runtime.engine, people[2:], RULES)
    await relay_outbox(runtime.engine, runtime.bus, topic)
    before = await parked_count(runtime, "activation")

    async def contacts_and_letters() -> bool:
        query = select(func.count()).where(crm_contacts.c.email.in_(emails))
        async with runtime.engine.connect() as conn:
            written = (await conn.execute(query)).scalar_one() == len(emails)
        return written and await parked_count(runtime, "activation") == before + 3

    await running(runtime, run_activation, contacts_and_letters)

    [letter] = await letters(runtime, f"{run}-poison")
    assert letter["consumer"] == "activation"
    assert letter["reason"].startswith("ValidationError") and "merged_ids" in letter["reason"]
    [letter] = await letters(runtime, f"{run}-newer")
    assert "version" in letter["reason"]
    [letter] = await letters(runtime, f"{run}-garbled")
    assert letter["reason"].startswith("JSONDecodeError")
    assert await parked_count(runtime, "activation") == before + 3


async def test_a_profile_update_too_large_for_kafka_is_parked(runtime: Runtime) -> None:
    run = uid()
    key = str(uuid.uuid4())
    huge = orjson.dumps({"profile_id": key, "blob": "x" * 2_000_000})
    async with runtime.engine.begin() as conn:
        await outbox.insert_outbox(conn, [outbox.Update(key, huge)])
    before = await parked_count(runtime, "resolver")

    async def relayed() -> bool:  # by this resolver or another test's: the table is shared
        async with runtime.engine.connect() as conn:
            left = await conn.execute(
                text("SELECT count(*) FROM profile_update_outbox WHERE key = :k"), {"k": key}
            )
            return left.scalar_one() == 0 and await _stored(runtime, f"{run}-after")

    topic = runtime.settings.topics.events
    await runtime.bus.publish(topic, b"k", orjson.dumps(event(f"{run}-after", f"u-{run}")))
    await running(runtime, run_resolver, relayed)
    assert await parked_count(runtime, "resolver") > before
    async with runtime.engine.connect() as conn:
        reason = await conn.execute(
            text("SELECT reason FROM dead_letters WHERE id > 0 ORDER BY id DESC LIMIT 20")
        )
        assert any("RecordTooLarge" in r for r in reason.scalars())


def _record(topic: str, value: dict[str, Any]) -> Record:
    return Record(topic, b"k", orjson.dumps(value))


async def _stored(runtime: Runtime, message_id: str) -> bool:
    query = select(func.count()).where(events_table.c.message_id == message_id)
    async with runtime.engine.connect() as conn:
        return bool((await conn.execute(query)).scalar_one())
