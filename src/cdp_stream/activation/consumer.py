"""The activation process: the consumer loop on ``cdp.profile-updates`` and its timers.

Per micro-batch, one transaction: the CRM feed and audience membership are brought up to
date from the profiles as they are now in Postgres (so a redelivered update changes
nothing), then the offsets are committed. Beside the loop run the CRM webhook deliveries,
the expiry of time-window audience members, and the DMP counts: each its own task, so a
slow webhook or a count never holds up the feed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.activation import audiences, crm, dmp, webhook
from cdp_stream.bus.base import Bus, BusUnavailable, Message, fill, next_offsets, rejoin
from cdp_stream.poison import DeadLetters, apply_isolating
from cdp_stream.profiles.db import Stopping, retrying
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)


def _decode(messages: list[Message]) -> list[tuple[Message, dict[str, Any]]]:
    updates = []
    for m in messages:
        try:
            update = orjson.loads(m.value)
        except orjson.JSONDecodeError:
            update = None
        if isinstance(update, dict) and "profile_id" in update:
            updates.append((m, update))
        else:  # not ours to understand (the resolver writes every update): skip, say so
            log.warning("skipping a record that is not a profile update at %s", m)
    return updates


async def run_activation(
    bus: Bus, engine: AsyncEngine, settings: Settings, stop: asyncio.Event
) -> None:
    """poll a batch -> one transaction (a poison update bisected out and dead-lettered)
    -> commit offsets; the timers beside it."""
    names, done = settings.topics, asyncio.Event()  # ``done`` stops the timers with us
    dead = DeadLetters(bus, engine, names.dead_letters, "activation", stop)
    timers = [
        asyncio.create_task(webhook.run_deliveries(engine, settings, done)),
        asyncio.create_task(
            audiences.run_expiry(engine, done, settings.audience_expiry_interval_s)
        ),
        asyncio.create_task(dmp.run_counts(engine, bus, settings, done)),
    ]

    async def apply(batch: Sequence[tuple[Message, dict[str, Any]]]) -> None:
        updates = [u for _, u in batch]

        async def work(conn: AsyncConnection) -> None:
            await crm.apply_updates(conn, updates, settings)
            await audiences.apply_updates(conn, updates, datetime.now(UTC))

        await retrying(engine, work, stop)

    async def park(item: tuple[Message, dict[str, Any]], exc: Exception) -> None:
        await dead.park_message(item[0], exc)

    consumer = bus.consumer(names.activation_group, [names.profile_updates])
    # Everything made so far (modules, SQLAlchemy's tables and caches, clients) lives as
    # long as the process: out of the collector's sight, the thousands of objects a batch
    # allocates no longer make each full collection walk ~140,000 of them (measured: GC
    # was most of the time spent decoding updates; benchmarks/pipeline.py, catch-up).
    gc.freeze()
    try:
        await audiences.resume_backfills(engine, stop)  # what a restart interrupted
        await consumer.start()
        while not stop.is_set():
            try:
                messages = await fill(
                    consumer,
                    settings.activation_batch_size,
                    settings.resolver_poll_timeout_ms,
                    settings.consumer_linger_ms,
                )
                if not messages:
                    continue
                await apply_isolating(_decode(messages), apply, park)
                await consumer.commit(next_offsets(messages))
            except BusUnavailable as exc:
                log.warning("bus unavailable, rejoining from the committed offsets: %s", exc)
                await rejoin(consumer, stop)
            except Stopping:
                log.info("stopping with the database away: the batch is redelivered later")
    except Stopping:
        log.info("stopped with the database away, before consuming")
    finally:
        done.set()
        await audiences.stop_backfills()
        await consumer.stop()
        await asyncio.gather(*timers, return_exceptions=True)
