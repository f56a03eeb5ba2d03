"""The bus contract (:mod:`cdp_stream.bus.base`), checked on both implementations.

Every test in the first part runs four times: on :class:`MemoryBus`, on
:class:`PostgresBus` against the real server (``pg_url``), and on :class:`KafkaBus` with
each of its producers (aiokafka, librdkafka) against the real broker (``kafka_bootstrap``;
either skipped locally, failed in CI when unreachable). Each test creates its own uniquely
named topics and groups, so tests do not see each other's records and the suite can be
re-run against the same broker.

The last part holds the few checks that only make sense on one implementation.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import pytest

from cdp_stream.bus.base import (
    Bus,
    BusUnavailable,
    Consumer,
    Message,
    Record,
    fill,
    next_offsets,
)
from cdp_stream.bus.confluent import ConfluentKafkaBus
from cdp_stream.bus.kafka import KafkaBus
from cdp_stream.bus.memory import MemoryBus, MemoryConsumer, partition_for_key
from cdp_stream.bus.postgres import PostgresBus, PostgresConsumer, postgres_dsn

# How long a test waits for records that must arrive (a Kafka rebalance takes seconds).
ARRIVE_S = 30.0


def quiet_ms(c: Consumer) -> int:
    """How long to keep polling to be sure nothing more arrives: the memory bus delivers
    synchronously, a Kafka fetch is asynchronous, Postgres reads at once or on NOTIFY."""
    if isinstance(c, MemoryConsumer):
        return 100
    return 500 if isinstance(c, PostgresConsumer) else 1_000


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(
    scope="module",
    params=[
        "memory",
        "postgres",
        pytest.param("kafka", marks=pytest.mark.kafka),
        pytest.param("kafka-confluent", marks=pytest.mark.kafka),
    ],
)
def where(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Which bus, and the server it needs (a sync fixture: it may set up an async one)."""
    if request.param == "postgres":
        return request.param, postgres_dsn(request.getfixturevalue("pg_url"))
    if request.param.startswith("kafka"):
        return request.param, request.getfixturevalue("kafka_bootstrap")
    return request.param, ""


@pytest.fixture(scope="module")
async def bus(where: tuple[str, str]) -> AsyncIterator[Bus]:
    """One bus per implementation, shared by the module's tests (topics are per test)."""
    kind, address = where
    b: Bus
    if kind == "memory":
        b = MemoryBus()
    elif kind == "postgres":
        b = PostgresBus(address, f"contract-{uid()}")
    else:
        producer = ConfluentKafkaBus if kind == "kafka-confluent" else KafkaBus
        b = producer(address, client_id=f"contract-{uid()}")
    await b.start()
    yield b
    await b.stop()


class MakeConsumer(Protocol):
    def __call__(
        self, group: str, topics: Sequence[str], linger_ms: int = 0
    ) -> Awaitable[Consumer]: ...


@pytest.fixture
async def member(bus: Bus) -> AsyncIterator[MakeConsumer]:
    """Start group members; whatever a test leaves running is stopped afterwards."""
    started: list[Consumer] = []

    async def make(group: str, topics: Sequence[str], linger_ms: int = 0) -> Consumer:
        c = bus.consumer(group, topics, linger_ms)
        started.append(c)
        await c.start()
        return c

    yield make
    await asyncio.gather(*(c.stop() for c in started))


async def new_topic(bus: Bus, partitions: int) -> str:
    name = f"contract-{uid()}"
    await bus.ensure_topics({name: partitions})
    return name


def group() -> str:
    return f"contract-g-{uid()}"


async def drain(consumer: Consumer, count: int, *, commit: bool = False) -> list[Message]:
    """Read until ``count`` records arrived (failing after ``ARRIVE_S``), then keep polling
    a little longer and return everything, so a duplicate or extra record shows up."""
    out: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ARRIVE_S
    while len(out) < count and loop.time() < deadline:
        batch = await consumer.getmany(max_records=500, timeout_ms=500)
        out.extend(batch)
        if commit and batch:
            await consumer.commit(next_offsets(batch))
    assert len(out) >= count, f"only {len(out)} of {count} records arrived"
    out.extend(await consumer.getmany(max_records=500, timeout_ms=quiet_ms(consumer)))
    return out


def positions(messages: Sequence[Message]) -> list[tuple[int, int]]:
    return sorted((m.partition, m.offset) for m in messages)


def by_partition(messages: Sequence[Message]) -> dict[int, list[Message]]:
    parts: dict[int, list[Message]] = defaultdict(list)
    for m in messages:
        parts[m.partition].append(m)
    return parts


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ARRIVE_S
    while not await check():
        assert loop.time() < deadline, f"timed out waiting until {what}"


# -- both buses ------------------------------------------------------------------------


async def test_new_group_reads_every_record_once_intact(bus: Bus, member: MakeConsumer) -> None:
    """Publish/publish_many are acknowledged and durable for a group that joins later: it
    reads each record exactly once, with key and value byte-for-byte as published (also a
    null key and an empty value), and offsets increase within each partition."""
    topic = await new_topic(bus, 3)
    sent: list[tuple[bytes | None, bytes]] = [(b"solo", b"\x00\xffbinary\n")]
    await bus.publish(topic, b"solo", b"\x00\xffbinary\n")
    await bus.publish(topic, None, b"no key")
    sent.append((None, b"no key"))
    many = [Record(topic, f"k{i % 7}".encode(), f"v{i}".encode()) for i in range(40)]
    many.append(Record(topic, b"empty", b""))
    await bus.publish_many(many)
    sent += [(r.key, r.value) for r in many]

    got = await drain(await member(group(), [topic]), len(sent))

    assert sorted(((m.key, m.value) for m in got), key=repr) == sorted(sent, key=repr)
    assert len(set(positions(got))) == len(got), "a record was delivered twice"
    assert all(m.topic == topic for m in got)
    for part, msgs in by_partition(got).items():
        offsets = [m.offset for m in msgs]
        assert offsets == list(range(len(msgs))), f"partition {part}: offsets {offsets}"


async def test_key_picks_partition_like_kafka_and_keeps_order(
    bus: Bus, member: MakeConsumer
) -> None:
    """A key always maps to one partition, namely Kafka's murmur2 choice (memory's
    ``partition_for_key`` agrees with where the real producer/broker put 200 keys, and the
    memory bus uses it), and the records of a key are consumed in publish order."""
    partitions, rounds = 5, 3
    topic = await new_topic(bus, partitions)
    keys = [f"user-{i}-{uid()}".encode() for i in range(200)]
    # Interleave the keys so that per-key order is not just publish order of a block.
    await bus.publish_many([Record(topic, k, f"{r}".encode()) for r in range(rounds) for k in keys])

    got = await drain(await member(group(), [topic]), len(keys) * rounds)

    assert len(got) == len(keys) * rounds
    per_key: dict[bytes, list[Message]] = defaultdict(list)
    for m in got:
        assert m.key is not None
        per_key[m.key].append(m)
    assert set(per_key) == set(keys)
    mismatched = {
        k: (msgs[0].partition, partition_for_key(k, partitions))
        for k, msgs in per_key.items()
        if msgs[0].partition != partition_for_key(k, partitions)
    }
    assert not mismatched, f"partition (actual, partition_for_key): {mismatched}"
    for k, msgs in per_key.items():
        assert {m.partition for m in msgs} == {msgs[0].partition}, f"{k!r} spans partitions"
        assert [m.value for m in msgs] == [b"0", b"1", b"2"], f"{k!r} out of order"
        assert [m.offset for m in msgs] == sorted(m.offset for m in msgs)
    assert len({m.partition for m in got}) == partitions


async def test_ensure_topics_is_idempotent_and_keeps_partitions(
    bus: Bus, member: MakeConsumer
) -> None:
    """ensure_topics on an existing topic changes nothing: no error, the partition count
    stays (even when asked for more), records already in it stay; keyed records spread
    over the topic's partitions and never beyond them."""
    topic = f"contract-{uid()}"
    await bus.ensure_topics({topic: 3})
    await bus.publish_many([Record(topic, f"a{i}".encode(), b"before") for i in range(30)])
    await bus.ensure_topics({topic: 3})
    await bus.ensure_topics({topic: 6})
    await bus.publish_many([Record(topic, f"b{i}".encode(), b"after") for i in range(30)])

    consumer = await member(group(), [topic])
    got = await drain(consumer, 60)

    assert consumer.assignment() == {(topic, p) for p in range(3)}
    assert len(got) == 60
    assert [m.value for m in got].count(b"before") == 30
    assert {m.partition for m in got} == {0, 1, 2}
    for m in got:
        assert m.key is not None
        assert m.partition == partition_for_key(m.key, 3)


async def test_new_member_gets_exactly_the_uncommitted_records(
    bus: Bus, member: MakeConsumer
) -> None:
    """At-least-once through commits: after a member commits part of what it read and
    stops, the next member of the group gets exactly the uncommitted records - none lost,
    none of the committed ones again."""
    topic, g = await new_topic(bus, 2), group()
    await bus.publish_many([Record(topic, f"k{i}".encode(), f"v{i}".encode()) for i in range(30)])

    first = await member(g, [topic])
    read = await drain(first, 30)
    assert len(read) == 30
    # A prefix of the consumption order is a prefix of every partition's records.
    done, rest = read[:15], read[15:]
    await first.commit(next_offsets(done))
    await first.stop()

    second = await member(g, [topic])
    again = await drain(second, len(rest))

    assert positions(again) == positions(rest)
    assert [(m.key, m.value) for m in sorted(again, key=lambda m: (m.partition, m.offset))] == [
        (m.key, m.value) for m in sorted(rest, key=lambda m: (m.partition, m.offset))
    ]


async def test_each_group_reads_every_record(bus: Bus, member: MakeConsumer) -> None:
    """Groups keep independent offsets: two groups on one topic each get every record,
    and one group's commits do not move the other's position."""
    topic = await new_topic(bus, 2)
    records = [Record(topic, f"k{i}".encode(), f"v{i}".encode()) for i in range(20)]
    await bus.publish_many(records)
    c1, c2 = await asyncio.gather(member(group(), [topic]), member(group(), [topic]))

    got1 = await drain(c1, len(records), commit=True)
    got2 = await drain(c2, len(records))

    want = sorted((r.key, r.value) for r in records)
    assert sorted((m.key, m.value) for m in got1) == want
    assert sorted((m.key, m.value) for m in got2) == want


async def test_members_split_partitions_and_survivor_takes_over(
    bus: Bus, member: MakeConsumer
) -> None:
    """Two members of one group own disjoint partition sets covering the topic, and each
    record goes to exactly one of them (the owner of its partition). When one stops, the
    other comes to own every partition and receives what is published afterwards, and
    nothing already committed is delivered again."""
    partitions = 4
    topic, g = await new_topic(bus, partitions), group()
    everything = {(topic, p) for p in range(partitions)}
    a = await member(g, [topic])
    b = await member(g, [topic])

    async def split() -> bool:
        await asyncio.sleep(0.05)
        sa, sb = a.assignment(), b.assignment()
        return bool(sa) and bool(sb) and not sa & sb and sa | sb == everything

    await eventually(split, "the two members split the partitions")
    owned_a, owned_b = a.assignment(), b.assignment()

    records = [Record(topic, f"k{i}".encode(), f"v{i}".encode()) for i in range(60)]
    await bus.publish_many(records)
    got_a: list[Message] = []
    got_b: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ARRIVE_S
    while len(got_a) + len(got_b) < len(records) and loop.time() < deadline:
        batch_a, batch_b = await asyncio.gather(a.getmany(500, 300), b.getmany(500, 300))
        for consumer, batch, got in ((a, batch_a, got_a), (b, batch_b, got_b)):
            got.extend(batch)
            if batch:
                await consumer.commit(next_offsets(batch))
    extra = await asyncio.gather(a.getmany(500, quiet_ms(a)), b.getmany(500, quiet_ms(b)))
    got_a += extra[0]
    got_b += extra[1]

    assert got_a and got_b, "both members must get records"
    assert {(topic, m.partition) for m in got_a} <= owned_a
    assert {(topic, m.partition) for m in got_b} <= owned_b
    both = got_a + got_b
    assert len(set(positions(both))) == len(both), "a record went to two members"
    assert sorted((m.key, m.value) for m in both) == sorted((r.key, r.value) for r in records)

    await b.stop()
    stray: list[Message] = []

    async def took_over() -> bool:
        stray.extend(await a.getmany(500, 200))
        return a.assignment() == everything

    await eventually(took_over, "the survivor owns every partition")
    later = [Record(topic, f"k{i}".encode(), f"later{i}".encode()) for i in range(40)]
    await bus.publish_many(later)
    got_later = stray + await drain(a, len(later))

    assert {m.partition for m in got_later} == set(range(partitions))
    assert sorted((m.key, m.value) for m in got_later) == sorted((r.key, r.value) for r in later), (
        "the survivor must get exactly the new records (the old ones were committed)"
    )


async def test_commit_for_unowned_partition_is_dropped_not_raised(
    bus: Bus, member: MakeConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit naming a partition the member does not own neither raises nor takes
    effect (it is logged); the owned part of the same commit still counts."""
    mine, other, g = await new_topic(bus, 1), await new_topic(bus, 1), group()
    await bus.publish_many([Record(mine, b"m", f"m{i}".encode()) for i in range(4)])
    await bus.publish_many([Record(other, b"o", f"o{i}".encode()) for i in range(3)])

    first = await member(g, [mine])
    read = await drain(first, 4)
    assert [m.value for m in read] == [b"m0", b"m1", b"m2", b"m3"]
    with caplog.at_level(logging.WARNING, logger="cdp_stream.bus"):
        await first.commit({(other, 0): 3})  # only a partition it does not own
        await first.commit({(mine, 0): 2, (other, 0): 3, (mine, 7): 1})
    refused = [r for r in caplog.records if "commit refused" in r.getMessage()]
    assert len(refused) == 2, caplog.text
    await first.stop()

    second = await member(g, [mine, other])
    got = await drain(second, 2 + 3)

    assert sorted(m.value for m in got if m.topic == mine) == [b"m2", b"m3"]
    assert sorted(m.value for m in got if m.topic == other) == [b"o0", b"o1", b"o2"]


async def test_getmany_waits_then_returns_empty_and_honours_max_records(
    bus: Bus, member: MakeConsumer
) -> None:
    """With nothing to read, getmany waits about its timeout (it neither spins nor hangs)
    and returns []; with records waiting it never returns more than max_records."""
    topic = await new_topic(bus, 1)
    consumer = await member(group(), [topic])
    loop = asyncio.get_running_loop()

    started = loop.time()
    assert await consumer.getmany(max_records=10, timeout_ms=400) == []
    elapsed = loop.time() - started
    assert 0.2 <= elapsed < 10, f"getmany(timeout_ms=400) returned after {elapsed:.2f}s"

    await bus.publish_many([Record(topic, b"k", f"v{i}".encode()) for i in range(10)])
    batches: list[list[Message]] = []
    deadline = loop.time() + ARRIVE_S
    while sum(map(len, batches)) < 10 and loop.time() < deadline:
        if batch := await consumer.getmany(max_records=3, timeout_ms=500):
            batches.append(batch)
    assert [len(b) <= 3 for b in batches] == [True] * len(batches), batches
    assert [m.value for b in batches for m in b] == [f"v{i}".encode() for i in range(10)]
    assert await consumer.getmany(max_records=3, timeout_ms=300) == []


async def test_fill_lingers_for_the_rest_of_a_batch(bus: Bus, member: MakeConsumer) -> None:
    """``fill`` (how the resolver and activation poll) with a member made to linger: records
    published one at a time, 50 ms apart, come in a few batches, not one a poll (Kafka's
    consumer lingers at the broker, the others in ``fill``); a batch stops at max_records."""
    topic = await new_topic(bus, 1)
    consumer = await member(group(), [topic], linger_ms=1_000)

    async def trickle() -> None:
        for i in range(10):
            await bus.publish(topic, b"k", f"t{i}".encode())
            await asyncio.sleep(0.05)

    sending = asyncio.create_task(trickle())
    batches: list[list[Message]] = []
    while sum(map(len, batches)) < 10:
        batches.append(await fill(consumer, 100, 5_000))
    await sending
    assert [m.value for b in batches for m in b] == [f"t{i}".encode() for i in range(10)]
    assert len(batches) <= 4, [len(b) for b in batches]

    await bus.publish_many([Record(topic, b"k", f"v{i}".encode()) for i in range(5)])
    got = await fill(consumer, 3, 5_000)
    assert [m.value for m in got] == [b"v0", b"v1", b"v2"]


async def test_lag_is_log_end_minus_committed_per_owned_partition(
    bus: Bus, member: MakeConsumer
) -> None:
    """``lag`` (``cdp_consumer_lag``): per partition the member owns, the records published
    minus those its group committed; reading without committing changes nothing."""
    topic = await new_topic(bus, 2)
    consumer = await member(group(), [topic])
    await bus.publish_many([Record(topic, None, f"v{i}".encode()) for i in range(10)])
    got = await drain(consumer, 10)
    per_partition = {p: len(msgs) for p, msgs in by_partition(got).items()}
    assert await consumer.lag() == {(topic, p): n for p, n in per_partition.items()} | {
        (topic, p): 0 for p in range(2) if p not in per_partition
    }
    first = got[0]
    await consumer.commit({(topic, first.partition): first.offset + 1})
    lag = await consumer.lag()
    assert lag[(topic, first.partition)] == per_partition[first.partition] - first.offset - 1
    await consumer.commit(next_offsets(got))
    assert await consumer.lag() == {(topic, p): 0 for p in range(2)}


# -- one implementation ----------------------------------------------------------------


@pytest.mark.parametrize("kind", [KafkaBus, ConfluentKafkaBus])
async def test_kafka_unreachable_broker_raises_bus_unavailable(kind: type[KafkaBus]) -> None:
    """Kafka only: with no broker, publish and ping raise BusUnavailable within a bounded
    time (the collector answers 503 instead of hanging); no real broker is needed."""
    dead = kind("127.0.0.1:1", client_id=f"contract-dead-{uid()}", publish_timeout_s=2)
    try:
        async with asyncio.timeout(15):
            with pytest.raises(BusUnavailable):
                await dead.publish(f"contract-{uid()}", b"k", b"v")
        async with asyncio.timeout(15):
            with pytest.raises(BusUnavailable):
                await dead.publish_many([Record(f"contract-{uid()}", None, b"v")])
        async with asyncio.timeout(15):
            with pytest.raises(BusUnavailable):
                await dead.ping()
    finally:
        await dead.stop()


async def test_memory_getmany_before_start_raises() -> None:
    """Memory only: a consumer that has not joined its group cannot read (a programming
    error, not an empty result)."""
    bus = MemoryBus()
    consumer = bus.consumer(group(), ["t"])
    with pytest.raises(RuntimeError, match="not started"):
        await consumer.getmany(max_records=1, timeout_ms=10)
    await consumer.start()
    assert await consumer.getmany(max_records=1, timeout_ms=10) == []
    await consumer.stop()
    with pytest.raises(RuntimeError, match="not started"):
        await consumer.getmany(max_records=1, timeout_ms=10)
