"""The in-process bus: Kafka's consumer-facing semantics without a broker.

It backs the one-box default (``cdp-stream up`` with no ``CDP_KAFKA_BOOTSTRAP``) and fast
tests. It keeps the contract of :mod:`cdp_stream.bus.base`, checked against both buses by
``tests/bus/test_contract.py``:

* topics of N partitions, each an append-only log with offsets;
* a keyed record goes to partition ``murmur2(key) % N`` exactly like Kafka's default
  partitioner, so a key lands on the same partition number as with a real broker;
  keyless records are spread round-robin;
* consumer groups: the partitions of the subscribed topics are dealt round-robin to the
  live members (aiokafka's default assignor), again whenever a member joins or leaves or a
  subscribed topic appears; committed offsets are kept per group and partition;
* at-least-once: a member reads from its group's committed offset (the log start when
  there is none) and moves on in memory; one that stops without committing leaves its
  records to the next owner. A commit for a partition that moved to another member is
  dropped with a warning (Kafka's ``CommitFailedError``), so those records are delivered
  again to the new owner.

What it does not promise: durability (an "ack" means "appended to a list in this
process", gone when it exits), more than one process, or a broker outage to test against.
Rebalances are instantaneous (Kafka's wait for in-flight batches at revoke time has no
counterpart: a batch whose partition moved is simply redelivered). Retention: records that
every group reading the topic has committed past are dropped (a group that appears later
starts at the oldest record kept, as with Kafka after retention); a topic no group reads
keeps its newest ``unread_retention`` records per partition.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cdp_stream.bus.base import Message, Record, TopicPartition

log = logging.getLogger(__name__)

_M = 0x5BD1E995
_U32 = 0xFFFFFFFF
# Consumed records are dropped in chunks so that trimming a log stays amortized O(1).
_TRIM_CHUNK = 4096


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``Utils.murmur2`` of the Java client) as an unsigned 32-bit
    integer; Java's signed value is this minus 2**32 when it is >= 2**31."""
    length = len(data)
    h = (0x9747B28C ^ length) & _U32
    whole = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * _M) & _U32
        k ^= k >> 24
        k = (k * _M) & _U32
        h = ((h * _M) & _U32) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * _M) & _U32
    h ^= h >> 13
    h = (h * _M) & _U32
    h ^= h >> 15
    return h


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` among ``partitions``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class _Log:
    """One partition: the records from offset ``start`` (the log start) on."""

    __slots__ = ("messages", "start")

    def __init__(self) -> None:
        self.start = 0
        self.messages: list[Message] = []

    @property
    def end(self) -> int:
        """The offset the next record will get."""
        return self.start + len(self.messages)

    def trim_to(self, offset: int) -> None:
        offset = min(offset, self.end)
        if offset > self.start:
            del self.messages[: offset - self.start]
            self.start = offset


@dataclass
class _Topic:
    logs: list[_Log]
    next_keyless: int = 0


@dataclass
class _Group:
    generation: int = 0
    members: dict[int, MemoryConsumer] = field(default_factory=dict)
    assignment: dict[int, frozenset[TopicPartition]] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class MemoryBus:
    """An in-process :class:`~cdp_stream.bus.base.Bus` (see the module docstring)."""

    def __init__(self, default_partitions: int = 1, *, unread_retention: int = 100_000) -> None:
        if default_partitions < 1:
            raise ValueError("default_partitions must be >= 1")
        self._default_partitions = default_partitions
        self._unread_retention = unread_retention
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._readers: dict[str, set[str]] = {}  # topic -> groups that ever subscribed
        self._member_ids = itertools.count(1)
        self._changed = asyncio.Event()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._wake()

    async def ensure_topics(self, topics: Mapping[str, int]) -> None:
        for name, partitions in topics.items():
            if name not in self._topics:
                self._create(name, partitions)

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._append(topic, key, value)
        self._wake()

    async def publish_many(self, records: Sequence[Record]) -> None:
        for r in records:
            self._append(r.topic, r.key, r.value)
        self._wake()

    async def ping(self) -> None:
        return None

    def consumer(self, group: str, topics: Sequence[str], linger_ms: int = 0) -> MemoryConsumer:
        return MemoryConsumer(self, group, topics, linger_ms)

    # -- logs ---------------------------------------------------------------------------

    def _create(self, name: str, partitions: int) -> _Topic:
        if partitions < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1")
        topic = _Topic([_Log() for _ in range(partitions)])
        self._topics[name] = topic
        for group in self._readers.get(name, ()):
            if self._groups[group].members:
                self._rebalance(group)
        return topic

    def _append(self, name: str, key: bytes | None, value: bytes) -> None:
        topic = self._topics.get(name) or self._create(name, self._default_partitions)
        n = len(topic.logs)
        if key is None:
            p = topic.next_keyless % n
            topic.next_keyless += 1
        else:
            p = partition_for_key(key, n)
        part = topic.logs[p]
        part.messages.append(Message(name, p, part.end, key, value))
        if len(part.messages) > self._unread_retention + _TRIM_CHUNK and not self._readers.get(
            name
        ):
            part.trim_to(part.end - self._unread_retention)

    def _trim_consumed(self, tp: TopicPartition) -> None:
        """Drop what every group reading the topic has committed past."""
        part = self._topics[tp[0]].logs[tp[1]]
        low = min(
            self._groups[g].committed.get(tp, part.start) for g in self._readers.get(tp[0], ())
        )
        if low - part.start >= _TRIM_CHUNK:
            part.trim_to(low)

    def _wake(self) -> None:
        """Wake every waiting ``getmany`` (new records or a new assignment)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- groups -------------------------------------------------------------------------

    def _join(self, member: MemoryConsumer) -> int:
        member_id = next(self._member_ids)
        group = self._groups.setdefault(member.group, _Group())
        group.members[member_id] = member
        for topic in member.topics:
            self._readers.setdefault(topic, set()).add(member.group)
        self._rebalance(member.group)
        return member_id

    def _leave(self, member: MemoryConsumer) -> None:
        group = self._groups[member.group]
        if group.members.pop(member.member_id, None) is not None:
            self._rebalance(member.group)

    def _rebalance(self, name: str) -> None:
        """Deal the group's partitions round-robin over its members (aiokafka's default)."""
        group = self._groups[name]
        group.generation += 1
        ids = sorted(group.members)
        owned: dict[int, set[TopicPartition]] = {m: set() for m in ids}
        subscribed = sorted({t for m in ids for t in group.members[m].topics} & self._topics.keys())
        turn = itertools.cycle(ids)
        for topic in subscribed:
            for p in range(len(self._topics[topic].logs)):
                member = next(turn)
                while topic not in group.members[member].topics:
                    member = next(turn)
                owned[member].add((topic, p))
        group.assignment = {m: frozenset(tps) for m, tps in owned.items()}
        log.debug("group %s generation %d: %s", name, group.generation, group.assignment)
        self._wake()


class MemoryConsumer:
    """A member of a consumer group on a :class:`MemoryBus`."""

    def __init__(
        self, bus: MemoryBus, group: str, topics: Sequence[str], linger_ms: int = 0
    ) -> None:
        self._bus = bus
        self.group = group
        self.topics = frozenset(topics)
        self.linger_ms = linger_ms
        self.member_id = 0  # 0: not a member (not started, or stopped)
        self._generation = 0
        self._positions: dict[TopicPartition, int] = {}
        self._turn = 0

    async def start(self) -> None:
        if self.member_id == 0:
            self.member_id = self._bus._join(self)

    async def stop(self) -> None:
        if self.member_id != 0:
            self._bus._leave(self)
            self.member_id = 0
            self._positions = {}

    def assignment(self) -> frozenset[TopicPartition]:
        if self.member_id == 0:
            return frozenset()
        return self._bus._groups[self.group].assignment.get(self.member_id, frozenset())

    async def getmany(self, max_records: int, timeout_ms: int) -> list[Message]:
        if self.member_id == 0:
            raise RuntimeError("consumer is not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            batch = self._take(max_records)
            remaining = deadline - loop.time()
            if batch or remaining <= 0 or self.member_id == 0:
                return batch
            changed = self._bus._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return []

    def _take(self, max_records: int) -> list[Message]:
        group = self._bus._groups[self.group]
        if self._generation != group.generation:
            # A new assignment: every owned partition restarts at the committed offset,
            # as a fresh assignment does in aiokafka.
            self._generation = group.generation
            owned = sorted(group.assignment.get(self.member_id, frozenset()))
            self._positions = {tp: group.committed.get(tp, 0) for tp in owned}
        tps = list(self._positions)
        out: list[Message] = []
        for i in range(len(tps)):
            tp = tps[(self._turn + i) % len(tps)]
            part = self._bus._topics[tp[0]].logs[tp[1]]
            pos = max(self._positions[tp], part.start)
            if pos >= part.end:
                continue
            first = pos - part.start
            chunk = part.messages[first : first + max_records - len(out)]
            out.extend(chunk)
            self._positions[tp] = pos + len(chunk)
            if len(out) >= max_records:
                break
        self._turn += 1
        return out

    async def lag(self) -> dict[TopicPartition, int]:
        owned = self.assignment()
        committed = self._bus._groups[self.group].committed if owned else {}
        return {tp: self._bus._topics[tp[0]].logs[tp[1]].end - committed.get(tp, 0) for tp in owned}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        owned = self.assignment()
        group = self._bus._groups.get(self.group)
        refused = sorted(tp for tp in offsets if tp not in owned)
        for tp, offset in offsets.items():
            if tp in owned and group is not None:
                group.committed[tp] = offset
                self._bus._trim_consumed(tp)
        if refused:
            log.warning(
                "group %s: commit refused for %s (partitions moved to another member); "
                "their records will be delivered again",
                self.group,
                refused,
            )
