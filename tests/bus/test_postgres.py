"""What only the Postgres bus promises, on the real server (the contract suite in
``test_contract.py`` runs on it as well): offsets handed out in commit order even under
concurrent publishers, a killed member's partitions and uncommitted records taken over,
committed records dropped after the retention, and a bounded backlog that turns into 503s
at the collector."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.base import BusUnavailable, Message, Record, next_offsets
from cdp_stream.bus.postgres import (
    PARTITION_FETCH_BYTES,
    PostgresBus,
    PostgresConsumer,
    postgres_dsn,
)
from cdp_stream.settings import Settings
from tests.support import eventually


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def dsn(pg_url: str) -> str:
    return postgres_dsn(pg_url)


@pytest.fixture
async def bus(dsn: str) -> AsyncIterator[PostgresBus]:
    # Housekeeping runs only when a test calls it (one round per call, no timing).
    b = PostgresBus(dsn, f"test-{uid()}", max_backlog=50, housekeeping_interval_s=3600)
    await b.start()
    yield b
    await b.stop()


async def read_all(consumer: PostgresConsumer, count: int, within_s: float = 30) -> list[Message]:
    out: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while len(out) < count and loop.time() < deadline:
        out.extend(await consumer.getmany(max_records=200, timeout_ms=300))
    return out


async def kept(dsn: str, topic: str) -> list[bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT value FROM bus_records r JOIN bus_topics t ON t.id = r.topic_id "
            'WHERE t.name = $1 ORDER BY r.partition, r."offset"',
            topic,
        )
    finally:
        await conn.close()
    return [r["value"] for r in rows]


async def test_concurrent_publishers_never_make_a_reader_skip_a_record(
    bus: PostgresBus, dsn: str
) -> None:
    """Offsets follow commit order: with transactions of several processes (buses)
    publishing to the same partitions at once while a member reads, it still receives
    every record once (a reader that passed an offset filled by a later commit would miss
    that record)."""
    topic = f"t-{uid()}"
    await bus.ensure_topics({topic: 2})
    publishers = [PostgresBus(dsn, f"test-{uid()}") for _ in range(3)]
    for b in publishers:
        await b.start()
    consumer = bus.consumer(f"g-{uid()}", [topic])
    await consumer.start()
    got: list[Message] = []
    published = asyncio.Event()

    async def read() -> None:
        while not published.is_set() or len(got) < 40 * 25:
            got.extend(await consumer.getmany(max_records=100, timeout_ms=100))

    async def publish(n: int) -> None:
        for i in range(25):
            record = Record(topic, f"k{i % 3}".encode(), f"{n}-{i}".encode())
            await publishers[n % 3].publish_many([record])

    reader = asyncio.create_task(read())
    await asyncio.gather(*(publish(n) for n in range(40)))
    published.set()
    async with asyncio.timeout(30):
        await reader
    await consumer.stop()
    for b in publishers:
        await b.stop()

    assert sorted(m.value for m in got) == sorted(
        f"{n}-{i}".encode() for n in range(40) for i in range(25)
    )
    for p in {m.partition for m in got}:
        offsets = [m.offset for m in got if m.partition == p]
        assert offsets == list(range(len(offsets))), f"partition {p} read out of order"


async def test_a_killed_members_partitions_and_uncommitted_records_go_to_the_survivor(
    bus: PostgresBus, dsn: str
) -> None:
    """A member whose connection dies (its process killed) loses its advisory locks at
    once: the survivor takes its partitions over and gets what it had not committed."""
    topic, group = f"t-{uid()}", f"g-{uid()}"
    await bus.ensure_topics({topic: 4})
    a, b = bus.consumer(group, [topic]), bus.consumer(group, [topic])
    await a.start()
    await b.start()

    async def split() -> bool:
        return bool(a.assignment() and b.assignment())

    await eventually(split, within_s=30)
    assert a.assignment() and b.assignment() and not a.assignment() & b.assignment()
    await bus.publish_many([Record(topic, f"k{i}".encode(), f"v{i}".encode()) for i in range(40)])
    read_by_b = await read_all(b, 1)
    assert read_by_b, "b owns partitions, so some records are its"
    await b.commit(next_offsets(read_by_b[:1]))  # one committed, the rest not

    admin = await asyncpg.connect(dsn)
    try:  # kill b's backend as a kill -9 of its process would end its connection
        await admin.execute("SELECT pg_terminate_backend($1)", b._conn.get_server_pid())
    finally:
        await admin.close()

    got = await read_all(a, 39)

    assert a.assignment() == {(topic, p) for p in range(4)}
    assert sorted(m.value for m in got) == sorted(
        f"v{i}".encode() for i in range(40) if f"v{i}".encode() != read_by_b[0].value
    )
    with pytest.raises(BusUnavailable):
        await b.getmany(max_records=10, timeout_ms=10)
    await a.stop()
    await b.stop()


async def test_records_every_group_committed_past_are_dropped_after_the_retention(
    dsn: str,
) -> None:
    """With retention 0, housekeeping deletes what every reading group committed past and
    keeps the rest; a group that joins later starts at the oldest record kept. With a
    retention, committed records stay until they are older than it."""
    bus = PostgresBus(dsn, f"test-{uid()}", retention_s=0, housekeeping_interval_s=3600)
    await bus.start()
    topic = f"t-{uid()}"
    await bus.ensure_topics({topic: 1})
    first, second = bus.consumer(f"g-{uid()}", [topic]), bus.consumer(f"g-{uid()}", [topic])
    await first.start()
    await second.start()
    await bus.publish_many([Record(topic, b"k", f"v{i}".encode()) for i in range(10)])
    await first.commit(next_offsets(await read_all(first, 10)))
    await second.commit(next_offsets((await read_all(second, 10))[:6]))

    await bus.housekeeping()
    assert await kept(dsn, topic) == [f"v{i}".encode() for i in range(6, 10)]
    late = bus.consumer(f"g-{uid()}", [topic])
    await late.start()
    assert [m.value for m in await read_all(late, 4)] == [f"v{i}".encode() for i in range(6, 10)]
    for c in (first, second, late):
        await c.stop()
    await bus.stop()

    keeping = PostgresBus(dsn, f"test-{uid()}", retention_s=0.5, housekeeping_interval_s=3600)
    await keeping.start()
    await keeping.publish_many([Record(topic, b"k", b"v10")])
    readers = [keeping.consumer(c.group, [topic]) for c in (first, second, late)]
    for reader, unread in zip(readers, (1, 5, 5), strict=True):
        await reader.start()
        await reader.commit(next_offsets(await read_all(reader, unread)))
    await keeping.housekeeping()  # the first look notes where the log ends
    assert len(await kept(dsn, topic)) == 5, "committed, but younger than the retention"
    await asyncio.sleep(0.6)
    await keeping.housekeeping()
    assert await kept(dsn, topic) == []
    for reader in readers:
        await reader.stop()
    await keeping.stop()


async def test_a_read_takes_about_a_mebibyte_of_each_partition(bus: PostgresBus) -> None:
    """As a Kafka fetch (``max.partition.fetch.bytes``): whatever ``max_records`` asks, a
    read takes records of a partition up to 1 MiB of values, and at least one however big;
    the rest, in order, on the next reads, nothing lost or repeated."""
    topic = f"t-{uid()}"
    await bus.ensure_topics({topic: 1})
    big = 400 * 1024
    values = [bytes([i]) * big for i in range(5)] + [b"x" * (3 * 1024 * 1024), b"small"]
    await bus.publish_many([Record(topic, b"k", v) for v in values])
    consumer = bus.consumer(f"g-{uid()}", [topic])
    await consumer.start()
    reads = []
    while sum(reads) < len(values):
        got = await consumer.getmany(max_records=100, timeout_ms=5_000)
        assert got, "a record was left behind"
        reads.append(len(got))
        assert sum(len(m.value) for m in got) <= PARTITION_FETCH_BYTES or len(got) == 1
    assert reads == [2, 2, 1, 1, 1]  # 800 KiB, 800 KiB, 400 KiB, 3 MiB alone, 5 bytes
    await consumer.stop()


async def test_publish_fails_past_the_backlog_and_recovers_once_consumed(
    bus: PostgresBus, dsn: str
) -> None:
    """Past ``max_backlog`` records a reading group has not committed, publish raises
    BusUnavailable (and writes nothing); once the group commits, publishing works again.
    A topic no group reads has no backlog."""
    topic, unread = f"t-{uid()}", f"t-{uid()}"
    await bus.ensure_topics({topic: 2, unread: 1})
    consumer = bus.consumer(f"g-{uid()}", [topic])
    await consumer.start()
    await bus.publish_many([Record(topic, f"k{i}".encode(), b"v") for i in range(50)])
    await bus.publish_many([Record(unread, None, b"v") for _ in range(80)])
    await bus.housekeeping()

    with pytest.raises(BusUnavailable, match="50 records wait for consumers"):
        await bus.publish(topic, b"k", b"refused")
    await bus.publish(unread, None, b"accepted")
    assert b"refused" not in await kept(dsn, topic)

    await consumer.commit(next_offsets(await read_all(consumer, 50)))
    await bus.housekeeping()
    await bus.publish(topic, b"k", b"accepted")
    await consumer.stop()


async def test_collector_answers_503_with_retry_after_when_the_backlog_is_full(
    pg_url: str,
) -> None:
    """``cdp-stream up``'s wiring without Kafka: the Postgres bus on the database, and a
    full backlog (the resolver's group has not consumed) gives the collector's 503."""
    key = f"wk_{uid()}"
    settings = Settings(
        database_url=pg_url,
        bootstrap_write_key=key,
        topic_namespace=f"test-{uid()}.",
        bus_max_backlog=30,
        retry_after_s=7,
    )
    runtime = await Runtime.start(settings, "test")
    assert isinstance(runtime.bus, PostgresBus)
    group = runtime.bus.consumer(settings.topics.resolver_group, [settings.topics.events])
    await group.start()
    transport = httpx.ASGITransport(app=create_app(runtime, ["collector"]))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:

            async def send(n: int) -> httpx.Response:
                batch = [{"type": "track", "event": "E", "userId": f"u{i}"} for i in range(n)]
                return await client.post("/v1/batch", json={"batch": batch}, auth=(key, ""))

            assert (await send(30)).status_code == 200
            await runtime.bus.housekeeping()
            refused = await send(1)
    finally:
        await group.stop()
        await runtime.stop()

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "7"
