"""The bus interface every stage talks to; nothing above it knows Kafka from memory.

Semantics both implementations keep (checked by ``tests/bus/test_contract.py``):

* ``publish``/``publish_many`` return only after the broker acknowledged every record;
  on failure they raise :class:`BusUnavailable` and the caller must assume nothing was
  accepted (records may still have been written: consumers dedupe by messageId), or
  :class:`RecordTooLarge` for a record the broker refuses for its size.
* A record goes to the partition chosen by hashing its key, so one key keeps its order.
* A consumer belongs to a named group; the group's partitions are split among its live
  members and each record is seen by one member of each group.
* Work is at-least-once: offsets move only through ``commit``; a member that stops (or
  dies) without committing leaves its records to be delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cdp_stream.retry import Stopping, retry, stopped_within

log = logging.getLogger(__name__)


class BusUnavailable(Exception):
    """The broker could not acknowledge in time: the caller must not report success."""


class RecordTooLarge(Exception):
    """The broker will never take a record this large: not an outage, and retrying cannot
    help. Records of the same call may have been written (consumers dedupe)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Message:
    """One consumed record with its position."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


TopicPartition = tuple[str, int]


class Consumer(Protocol):
    """A member of a consumer group."""

    linger_ms: int
    """How long :func:`fill` waits for the rest of a batch after a poll that did not fill
    one: the linger asked of :meth:`Bus.consumer`, or 0 where the broker waits instead."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Leave the group promptly; uncommitted records are redelivered to others."""

    async def getmany(self, max_records: int, timeout_ms: int) -> list[Message]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` for the first."""

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the *next* record to read.

        A commit the group no longer accepts is logged and dropped, never raised: the
        partitions moved to another member in a rebalance (Kafka's ``CommitFailedError``)
        or the broker did not answer in time. Those records are delivered again (to
        their new owner), which at-least-once consumers must handle anyway.
        """

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member owns now; empty until it has joined the group."""

    async def lag(self) -> dict[TopicPartition, int]:
        """Per partition this member owns, how many records the group is behind: the log
        end offset minus the group's committed offset (its metric, ``cdp_consumer_lag``).
        Raises :class:`BusUnavailable` when the broker does not answer."""


class Bus(Protocol):
    """Publish with acks, consume as a group, commit after work."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ensure_topics(self, topics: Mapping[str, int]) -> None:
        """Create the topics (name -> partitions) that do not exist yet."""

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None: ...

    async def publish_many(self, records: Sequence[Record]) -> None:
        """Publish all records and wait for every acknowledgement."""

    async def ping(self) -> None:
        """Raise :class:`BusUnavailable` when the broker cannot be reached."""

    def consumer(self, group: str, topics: Sequence[str], linger_ms: int = 0) -> Consumer:
        """A member of ``group``; ``linger_ms``: how long a poll that found part of a batch
        waits for the rest (see :func:`fill`)."""


async def fill(consumer: Consumer, max_records: int, timeout_ms: int) -> list[Message]:
    """Up to ``max_records`` records: the first wait as ``getmany``'s, then, when fewer came,
    the consumer's ``linger_ms`` more for the rest of the batch. Why: a consumer's cost is
    mostly per batch (round trips, a commit), and at a steady few hundred records/s a poll
    would return a handful at a time; a short linger makes the batches several times larger
    for that much latency. (Kafka's consumer lingers at the broker instead: see
    :class:`~cdp_stream.bus.kafka.KafkaConsumer`.)"""
    messages = await consumer.getmany(max_records, timeout_ms)
    if messages and consumer.linger_ms > 0 and len(messages) < max_records:
        await asyncio.sleep(consumer.linger_ms / 1000)
        messages += await consumer.getmany(max_records - len(messages), 0)
    return messages


def next_offsets(messages: Sequence[Message]) -> dict[TopicPartition, int]:
    """The offsets to commit after processing ``messages``: last offset + 1 per partition."""
    offsets: dict[TopicPartition, int] = {}
    for m in messages:
        tp = (m.topic, m.partition)
        offsets[tp] = max(offsets.get(tp, 0), m.offset + 1)
    return offsets


async def rejoin(consumer: Consumer, stop: asyncio.Event) -> None:
    """Leave and join the group again, after a bus failure in the middle of a batch: the
    consumer's position had moved past records that were not processed, and only a fresh
    assignment restarts at the committed offsets. A second's wait before each try, cut
    short by ``stop`` (then it returns, left)."""
    await consumer.stop()

    def not_yet(exc: Exception, _delay: float) -> None:
        log.warning("cannot rejoin the group yet: %s", exc)

    with contextlib.suppress(Stopping):
        if not await stopped_within(stop, 1.0):
            await retry(
                consumer.start,
                retry_if=lambda exc: isinstance(exc, BusUnavailable),
                delays=itertools.repeat(1.0),
                stop=stop,
                on_retry=not_yet,
            )
