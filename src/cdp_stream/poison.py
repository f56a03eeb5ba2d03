"""Poison records: find the record of a batch that a consumer can never apply, park it on
the dead-letter topic with its reason, and go on with the others.

A consumer applies a micro-batch as a whole. When that fails for a reason that is not an
outage, the batch is split in halves and each half applied on its own, recursively, until
the failing records stand alone: those are parked (published to ``cdp.dead-letters`` and
counted in the ``dead_letters`` table and in ``cdp_dead_letters_total``), everything else
is applied. The
cost is a few extra transactions for a batch that holds a poison record, nothing otherwise.

Transient failures are never poison: the bus away (:class:`BusUnavailable`), the database
away (``retrying`` waits for it, and :func:`cdp_stream.profiles.db.is_outage` says which
errors those are), a stop. They propagate, and the batch is retried whole. A record the
broker refuses for its size (:class:`RecordTooLarge`) is poison: it never fits.

Both consumers downstream of the collector use this one helper: the resolver (events) and
activation (profile updates); the resolver's outbox relay too, for a profile update too
large for Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream import logs, metrics
from cdp_stream.bus.base import Bus, BusUnavailable, Message
from cdp_stream.profiles import dead_letters
from cdp_stream.profiles.db import is_outage, retrying
from cdp_stream.retry import Stopping

log = logging.getLogger(__name__)
T = TypeVar("T")

# Well under Kafka's default 1 MiB record limit, so the dead letter itself always fits.
MAX_KEPT_BYTES = 256 * 1024


def _transient(exc: Exception) -> bool:
    return isinstance(exc, BusUnavailable | Stopping) or is_outage(exc)


async def apply_isolating(
    items: Sequence[T],
    apply: Callable[[Sequence[T]], Awaitable[None]],
    park: Callable[[T, Exception], Awaitable[None]],
) -> int:
    """``apply(items)``; on a failure that is not transient, bisect down to the failing
    items and ``park`` each with its error. Returns how many were parked."""
    try:
        await apply(items)
        return 0
    except Exception as exc:
        if _transient(exc):
            raise
        if len(items) == 1:
            await park(items[0], exc)
            return 1
        log.info("a batch of %d failed (%r): applying its halves apart", len(items), exc)
    middle = len(items) // 2
    parked = await apply_isolating(items[:middle], apply, park)
    return parked + await apply_isolating(items[middle:], apply, park)


def reason_of(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


@dataclass(frozen=True)
class DeadLetters:
    """Where one consumer parks its poison records."""

    bus: Bus
    engine: AsyncEngine
    topic: str
    consumer: str
    stop: asyncio.Event | None = None

    async def park(self, origin: str, key: bytes | None, value: bytes, exc: Exception) -> None:
        """Publish the record with its reason (acknowledged), then count it.

        ``origin`` says where it came from (``topic[partition]@offset``, or the outbox);
        the record is kept whole, as text, so it can be replayed once the cause is fixed.
        """
        reason = reason_of(exc)
        log.error("%s: parking %s on %s: %s", self.consumer, origin, self.topic, reason)
        letter = {
            "consumer": self.consumer,
            "origin": origin,
            "reason": reason,
            "key": None if key is None else key.decode("utf-8", "replace"),
            "value": value[:MAX_KEPT_BYTES].decode("utf-8", "replace"),
            "size": len(value),  # a record too large for Kafka is kept in part only
        }
        await self.bus.publish(self.topic, key, orjson.dumps(letter))

        async def count(conn: AsyncConnection) -> None:
            await dead_letters.record(conn, self.consumer, origin, reason)

        await retrying(self.engine, count, self.stop)
        metrics.dead_letters.labels(self.consumer).inc()

    async def park_message(self, message: Message, exc: Exception) -> None:
        origin = f"{message.topic}[{message.partition}]@{message.offset}"
        with logs.bind(topic=message.topic, partition=message.partition, offset=message.offset):
            await self.park(origin, message.key, message.value, exc)
