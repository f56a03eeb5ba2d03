"""The activation process: its stage on the consumer runtime (:mod:`cdp_stream.consuming`)
over ``cdp.profile-updates``, and its timers.

Per micro-batch, one transaction: the CRM feed and audience membership are brought up to
date from the profiles as they are now in Postgres (so a redelivered update changes
nothing), then the offsets are committed. A record that is not a
:class:`cdp_stream.updates.ProfileUpdate` (of a version this code knows) is parked on the
dead-letter topic. Beside the loop run the CRM webhook deliveries, the expiry of
time-window audience members, and the DMP counts: each its own task, so a slow webhook or
a count never holds up the feed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream import logs
from cdp_stream.activation.audiences import backfill, membership
from cdp_stream.activation.crm import feed as crm_feed
from cdp_stream.activation.crm import webhook
from cdp_stream.activation.dmp import counts as dmp_counts
from cdp_stream.bus.base import Bus, Message
from cdp_stream.consuming import Polling, run_consumer
from cdp_stream.poison import DeadLetters
from cdp_stream.profiles.db import retrying
from cdp_stream.retry import Stopping
from cdp_stream.settings import Settings
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)

_Update = tuple[Message, crm_feed.Incoming]
# Updates decoded between two yields to the loop: about 2 ms of Python.
_CHUNK = 100


class _Activation:
    """Activation's :class:`cdp_stream.consuming.Stage`."""

    def __init__(
        self, engine: AsyncEngine, settings: Settings, dead: DeadLetters, stop: asyncio.Event
    ) -> None:
        self._engine, self._settings, self._dead, self._stop = engine, settings, dead, stop

    async def decode(self, messages: Sequence[Message]) -> list[_Update]:
        """Parsed by orjson, then validated: a third less CPU than pydantic's own parser
        on an update with its event (and the same refusals); and what the CRM feed makes
        of each alone (``crm_feed.incoming``). Run while the batch before is in its
        transaction (the runtime polls ahead), yielding every :data:`_CHUNK` updates so
        that a statement's answer does not wait for the whole batch's decode."""
        updates = []
        for i, m in enumerate(messages):
            if i % _CHUNK == 0:
                await asyncio.sleep(0)
            try:
                update = ProfileUpdate.model_validate(orjson.loads(m.value))
                updates.append((m, crm_feed.incoming(update, self._settings)))
            except Exception as exc:  # not an update, or events the feed fails on: the
                await self._dead.park_message(m, exc)  # same every time, never applied
        return updates

    async def apply(self, batch: Sequence[_Update], wait: bool) -> Sequence[_Update]:
        """The batch in one transaction, waiting for whatever locks it needs (it holds
        nothing back)."""
        incoming = [i for _, i in batch]
        updates = [i.update for i in incoming]

        async def work(conn: AsyncConnection) -> None:
            read = await crm_feed.apply_updates(conn, incoming, self._settings)
            await membership.apply_updates(conn, updates, datetime.now(UTC), read)

        await retrying(self._engine, work, self._stop)
        return ()

    async def between(self) -> None:
        return None

    async def applied(self) -> None:
        return None


async def run_activation(
    bus: Bus, engine: AsyncEngine, settings: Settings, stop: asyncio.Event
) -> None:
    """poll a batch -> one transaction (a poison update bisected out and dead-lettered)
    -> commit offsets; the timers beside it."""
    logs.set_stage("activation")
    names, done = settings.topics, asyncio.Event()  # ``done`` stops the timers with us
    dead = DeadLetters(bus, engine, names.dead_letters, "activation", stop)
    timers = [
        asyncio.create_task(webhook.run_deliveries(engine, settings, done)),
        asyncio.create_task(
            membership.run_expiry(engine, done, settings.audience_expiry_interval_s)
        ),
        asyncio.create_task(dmp_counts.run_counts(engine, bus, settings, done)),
    ]
    polling = Polling(
        settings.activation_batch_size,
        settings.activation_poll_timeout_ms,
        settings.activation_linger_ms,
    )
    try:
        await backfill.resume_backfills(engine, stop)  # what a restart interrupted
        stage = _Activation(engine, settings, dead, stop)
        await run_consumer(
            bus, names.activation_group, [names.profile_updates], stage, polling, dead, stop
        )
    except Stopping:
        log.info("stopped with the database away, before consuming")
    finally:
        done.set()
        await backfill.stop_backfills()
        await asyncio.gather(*timers, return_exceptions=True)
