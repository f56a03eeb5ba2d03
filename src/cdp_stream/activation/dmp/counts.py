"""A DMP count run and the timer that repeats it: per audience, tally its consenting
members, anonymize, noise, and publish what changed to ``cdp.dmp.audience-counts``, one
transaction per audience committed only after the broker acked. The message shape and the
steps in order: docs/dmp.md.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from datetime import UTC, datetime

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream import metrics
from cdp_stream.activation.audiences import audience_ids
from cdp_stream.activation.dmp import repository as dmp_repo
from cdp_stream.activation.dmp.anonymize import Cell, anonymize, suppressed
from cdp_stream.activation.dmp.dimensions import check_settings, window_start
from cdp_stream.activation.dmp.noise import LaplaceNoise
from cdp_stream.bus.base import Bus, BusUnavailable, Record
from cdp_stream.profiles.db import retrying
from cdp_stream.retry import stopped_within
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)


def message(
    topic: str,
    audience_id: uuid.UUID,
    window: str,
    start: datetime,
    cell: Cell,
    count: int | None,
    eps: float | None,
) -> Record:
    """The one message shape: docs/dmp.md; nothing else goes in."""
    value = {
        "audience_id": str(audience_id),
        "window": window,
        "window_start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),  # as the API writes it
        "dimension": cell[0],
        "bucket": cell[1],
        "count": count,
        "epsilon": eps,
    }
    return Record(topic, str(audience_id).encode(), orjson.dumps(value))


async def _count_audience(
    conn: AsyncConnection,
    audience_id: uuid.UUID,
    settings: Settings,
    now: datetime,
    noise: LaplaceNoise | None,
    topic: str,
) -> list[Record]:
    """Count one audience and bring its current windows' rows up to date; the records
    for what changed (new or different counts, withdrawn buckets)."""
    if not await dmp_repo.try_lock(conn, audience_id):
        return []  # another activation process is counting it right now
    tallied = await dmp_repo.tally(conn, audience_id, settings.dmp_dimensions)
    exact = anonymize(tallied, settings.dmp_k)
    metrics.dmp_buckets.labels("suppressed").inc(suppressed(tallied, exact))
    eps = noise.epsilon if noise is not None else None
    counts = {
        cell: noise.noisy((str(audience_id), *cell), n) if noise is not None else n
        for cell, n in exact.items()
    }
    records: list[Record] = []
    for window in dict.fromkeys(settings.dmp_windows):
        start = window_start(now, window)
        before = await dmp_repo.stored_counts(conn, audience_id, window, start)
        changed = {cell: n for cell, n in counts.items() if before.get(cell) != (n, eps)}
        gone = sorted(before.keys() - counts.keys())
        if changed:
            await dmp_repo.write_counts(conn, audience_id, window, start, changed, eps)
        await dmp_repo.withdraw_counts(conn, audience_id, window, start, gone)
        records += [
            message(topic, audience_id, window, start, c, n, eps) for c, n in changed.items()
        ]
        records += [message(topic, audience_id, window, start, c, None, eps) for c in gone]
    return records


async def count_once(
    engine: AsyncEngine,
    bus: Bus,
    settings: Settings,
    now: datetime,
    *,
    noise_key: bytes | None = None,
) -> int:
    """Count every audience for the windows ``now`` falls in; the number of messages
    published. One transaction per audience, committed only after the broker acked its
    messages, so the table never says what the topic did not (a failed publish rolls
    back and the next run publishes it). Several activation processes may run this at
    once: an advisory lock per audience lets one count it while the others skip it.
    ``noise_key``: the noise's secret (see docs/dmp.md); None draws a fresh one,
    i.e. fresh noise."""
    check_settings(settings)
    noise = None
    if settings.dmp_epsilon is not None:
        noise = LaplaceNoise(settings.dmp_epsilon, noise_key or secrets.token_bytes(32))
    topic = settings.topics.dmp_audience_counts
    async with engine.connect() as conn:
        ids = await audience_ids(conn)
    published = 0
    for audience_id in ids:

        async def work(conn: AsyncConnection, audience_id: uuid.UUID = audience_id) -> int:
            records = await _count_audience(conn, audience_id, settings, now, noise, topic)
            if records:
                await bus.publish_many(records)
            return len(records)

        n = await retrying(engine, work)
        metrics.dmp_buckets.labels("published").inc(n)
        published += n
    return published


async def run_counts(
    engine: AsyncEngine, bus: Bus, settings: Settings, stop: asyncio.Event
) -> None:
    """Count every ``settings.dmp_interval_s`` until ``stop``; a failed run is logged and
    the next one tries again (a timer that died quietly would freeze the feed)."""
    check_settings(settings)
    configured = settings.dmp_noise_key
    noise_key = configured.get_secret_value().encode() if configured else secrets.token_bytes(32)
    while not stop.is_set():
        try:
            n = await count_once(engine, bus, settings, datetime.now(UTC), noise_key=noise_key)
            log.debug("DMP counts: %d messages published", n)
        except BusUnavailable as exc:
            log.warning("DMP counts not published (bus unavailable), next run retries: %s", exc)
        except Exception:
            log.exception("DMP count run failed; the next run tries again")
        await stopped_within(stop, settings.dmp_interval_s)
