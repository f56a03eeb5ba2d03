"""The resolver stage on the consumer runtime (:mod:`cdp_stream.consuming`): poll a batch
-> one transaction -> commit offsets, the outbox relayed beside it (after each commit, and
at start-up), the next batch polled, decoded and prepared while one's transaction runs
(the runtime's poll ahead: Python and Postgres overlap).

Offsets are committed only after the database commit, batch after batch in order, so a
crash anywhere before it redelivers the batch (and the one taken ahead), and
``batch.apply_prepared`` turns the redelivery into a no-op.
Profile updates are written to an outbox table in the batch's transaction and published to
``cdp.profile-updates`` from memory after it commits (the table itself is relayed at
start-up and after a failure): a crash between the commit and the publish leaves them in
the outbox for the next relay, never lost. Every
``resolver_outbox_vacuum_s`` the loop vacuums the outbox (one resolver at a time), so the
rows relayed do not pile up as dead tuples between autovacuum passes. An event with no
usable identifier is not stored; it goes to the rejected topic with that reason, and so
does an event for a deleted person (reason ``suppressed``): it must not re-create them.
A record that is not an event as :class:`cdp_stream.events.Event` describes it (not JSON,
or missing what the collector always sets) is parked on the rejected topic rather than
blocking its partition forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from pydantic import ConfigDict
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream import logs, metrics
from cdp_stream.bus.base import Bus, BusUnavailable, Message, Record
from cdp_stream.consuming import Polling, run_consumer
from cdp_stream.events import Event
from cdp_stream.identity import IdentityRules
from cdp_stream.poison import DeadLetters, apply_isolating
from cdp_stream.profiles import outbox
from cdp_stream.profiles.db import retrying
from cdp_stream.profiles.outbox import Update
from cdp_stream.profiles.suppression import rekey
from cdp_stream.resolver.batch import BatchResult, Prepared, apply_prepared, prepare
from cdp_stream.retry import Stopping
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)

_UNIDENTIFIED = "no usable identifier (every id is missing or blocked)"


def _origin(event: dict[str, Any]) -> dict[str, Any]:
    return {k: event.get(k) for k in ("sourceId", "messageId", "type", "receivedAt")}


async def apply_with_retry(
    engine: AsyncEngine,
    events: Sequence[dict[str, Any]],
    rules: IdentityRules,
    stop: asyncio.Event | None = None,
) -> BatchResult:
    """One transaction for the batch, retried on conflicts and outages (see ``retrying``);
    what each event alone implies is worked out first, outside it."""
    return await _apply(engine, prepare(events, rules), rules, stop)


async def _apply(
    engine: AsyncEngine,
    batch: Sequence[Prepared],
    rules: IdentityRules,
    stop: asyncio.Event | None,
    wait: bool = True,
) -> BatchResult:
    result = await retrying(engine, lambda conn: apply_prepared(conn, batch, rules, wait), stop)
    _count(result)
    return result


def _publisher(
    bus: Bus, topic: str, dead: DeadLetters | None
) -> Callable[[Sequence[tuple[str, bytes]]], Awaitable[None]]:
    """Publishes (key, JSON) profile updates; with ``dead``, one Kafka refuses for its size
    is parked there instead of blocking the rest."""

    async def publish(rows: Sequence[tuple[str, bytes]]) -> None:
        started = time.perf_counter()
        await bus.publish_many([Record(topic, key.encode(), value) for key, value in rows])
        metrics.produce_duration.labels("resolver").observe(time.perf_counter() - started)
        metrics.profile_updates_relayed.inc(len(rows))

    async def park(row: tuple[str, bytes], exc: Exception) -> None:
        if dead is None:
            raise exc
        await dead.park("profile_update_outbox", row[0].encode(), row[1], exc)

    async def run(rows: Sequence[tuple[str, bytes]]) -> None:
        await apply_isolating(rows, publish, park)

    return run


async def publish_written(
    engine: AsyncEngine,
    bus: Bus,
    topic: str,
    written: Mapping[int, Update],
    dead: DeadLetters | None = None,
) -> None:
    """Publish the updates a committed batch wrote (outbox row id -> update) from memory,
    then delete their rows (autocommit: one round trip). A failure leaves them for
    ``relay_outbox``; the rows of updates published before it are published again then."""
    await _publisher(bus, topic, dead)([(u.key, u.record()) for u in written.values()])
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await outbox.delete_outbox(conn, list(written))


async def relay_outbox(
    engine: AsyncEngine,
    bus: Bus,
    topic: str,
    dead: DeadLetters | None = None,
    limit: int = 5000,
    ids: Sequence[int] | None = None,
    older_than_s: float | None = None,
) -> int:
    """Publish pending profile updates, oldest first, and delete them once acknowledged;
    with ``ids``, only those rows (the ones a request queued: the rest are the resolvers');
    with ``older_than_s``, only rows written that long ago.

    Rows are taken with ``SKIP LOCKED``, so resolvers relay side by side; a failure before
    the delete commits leaves the rows for the next relay (at-least-once: a consumer of
    ``cdp.profile-updates`` dedupes by profile and messageId). With ``dead``, an update
    Kafka refuses for its size is parked there instead of blocking the outbox.
    """
    relayed = 0
    publish = _publisher(bus, topic, dead)

    async def step(conn: AsyncConnection) -> int:
        rows = await outbox.take_outbox(conn, limit, ids, older_than_s)
        await publish(rows)
        return len(rows)

    # A take short of ``limit`` found all there was: another round would cost a
    # transaction per batch to find nothing (rows others hold, they relay themselves).
    while True:
        n = await retrying(engine, step, dead.stop if dead else None)
        relayed += n
        if n < limit:
            return relayed


class _Checked(Event):
    """:class:`Event`'s rules without keeping its extra keys: the resolver reads the
    decoded dict, and copying every extra key into a model cost a third of decoding."""

    model_config = ConfigDict(extra="ignore")


async def vacuum_outbox(engine: AsyncEngine) -> None:
    """Reclaim the relayed outbox rows now (see ``outbox.vacuum_outbox``), and count the
    ones left (``cdp_profile_updates_outbox_rows``). Best effort: a failure is logged and
    the next interval tries again."""
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await outbox.vacuum_outbox(conn)
            metrics.outbox_rows.set(await outbox.outbox_depth(conn))
    except (DBAPIError, OSError) as exc:
        log.warning("could not vacuum the outbox, trying again later: %s", exc)


# Events decoded and prepared between two yields to the loop while the previous batch's
# transaction runs: about 2 ms of Python, the most a statement's answer waits for it.
_CHUNK = 50


async def _decode(
    bus: Bus, rejected: str, messages: Sequence[Message]
) -> list[tuple[Message, dict[str, Any]]]:
    """The events of the batch, each with its record; what is not an event is parked on
    the rejected topic."""
    events: list[tuple[Message, dict[str, Any]]] = []
    for i, m in enumerate(messages):
        if i % _CHUNK == _CHUNK - 1:
            await asyncio.sleep(0)
        try:
            value = orjson.loads(m.value)
            _Checked.model_validate(value)
            events.append((m, value))
        except ValueError as exc:  # orjson's and pydantic's errors are ValueErrors
            reason = f"not an event at {m.topic}[{m.partition}]@{m.offset}: {exc}"
            record = {"reason": reason, "raw": m.value.decode("utf-8", "replace")}
            await bus.publish(rejected, m.key, orjson.dumps(record))
            metrics.events_rejected.labels("resolver", "", "not_an_event").inc()
            with logs.bind(topic=m.topic, partition=m.partition, offset=m.offset):
                log.warning("a record that is not an event: set aside on %s", rejected)
    return events


# An event and, when it could be worked out ahead, its prepared form.
_Item = tuple[dict[str, Any], Prepared | None]


def _prepared(
    chunk: Sequence[tuple[Message, dict[str, Any]]], rules: IdentityRules
) -> list[Prepared | None]:
    """``prepare`` of a chunk taken ahead; if it fails, None for each event: they are
    prepared again in their batch's ``apply``, where a poison event is isolated."""
    try:
        return list(prepare([e for _, e in chunk], rules, [m.value for m, _ in chunk]))
    except Exception:
        return [None] * len(chunk)


async def _decode_prepared(
    bus: Bus, rejected: str, messages: Sequence[Message], rules: IdentityRules
) -> list[tuple[Message, _Item]]:
    """The batch decoded and prepared. Run while the batch before it is in its
    transaction (the runtime polls ahead): the work here needs no lock, so it fills the
    time the loop would otherwise spend waiting for Postgres, yielding every
    :data:`_CHUNK` events so that the transaction's statements are answered promptly."""
    events = await _decode(bus, rejected, messages)
    items: list[tuple[Message, _Item]] = []
    for i in range(0, len(events), _CHUNK):
        await asyncio.sleep(0)
        chunk = events[i : i + _CHUNK]
        prepared = _prepared(chunk, rules)
        items += [(m, (e, p)) for (m, e), p in zip(chunk, prepared, strict=True)]
    return items


# An outbox row this old is a leftover: a batch's own rows are published and deleted
# within its broker's acknowledgement time (``publish_timeout_s``, 10 s by default).
LEFTOVER_AGE_S = 30.0


class _Relay:
    """The outbox relayed beside the loop, not in it: a batch's updates are published
    (waiting for the broker's acknowledgements) while the next batch is polled and
    applied, and its offsets are committed without waiting for them: the outbox holds
    them. The updates this resolver's batches wrote are published from memory
    (``publish_written``: no read of the table and its events back); the table itself is
    relayed (``relay_outbox``) at start-up and after a failure, for what a crash or an
    outage left in it, and until then nothing is published from memory, so an update is
    not overtaken by a later one of the same profile. Rows older than
    :data:`LEFTOVER_AGE_S` are swept every ``resolver_outbox_vacuum_s`` (``sweep``): what
    another process left (a request whose publish failed, a batch whose commit was
    reported lost and then applied again as duplicates). One relay at a time; one asked for
    while another runs makes that one go round again, so every commit is followed by a
    relay that started after it. A relay that fails (broker or database away) is logged
    and leaves its rows in the outbox; ``failed`` says to ask again."""

    def __init__(self, engine: AsyncEngine, bus: Bus, topic: str, dead: DeadLetters) -> None:
        self._engine, self._bus, self._topic, self._dead = engine, bus, topic, dead
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._written: dict[int, Update] = {}  # committed, not yet published
        self._from_table = True  # what a crash left there first
        self._leftovers = False
        self.failed = False

    def hand(self, written: Mapping[int, Update]) -> None:
        """Updates of a batch that committed, by outbox row id: relay them."""
        self._written.update(written)
        self.kick()

    def sweep(self) -> None:
        """Relay the rows left in the outbox :data:`LEFTOVER_AGE_S` ago or more."""
        self._leftovers = True
        self.kick()

    def kick(self) -> None:
        if self._task is None or self._task.done():
            self.failed = False
            self._task = asyncio.create_task(self._run())
        else:
            self._again = True

    async def _run(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            try:
                if self._from_table:
                    self._written.clear()  # committed, so in the table: taken from there
                    await relay_outbox(self._engine, self._bus, self._topic, self._dead)
                    self._from_table = self._leftovers = False
                if self._leftovers:
                    self._leftovers = False
                    await relay_outbox(
                        self._engine,
                        self._bus,
                        self._topic,
                        self._dead,
                        older_than_s=LEFTOVER_AGE_S,
                    )
                if self._written:
                    written, self._written = self._written, {}
                    await publish_written(self._engine, self._bus, self._topic, written, self._dead)
            except (BusUnavailable, Stopping, DBAPIError, OSError) as exc:
                log.warning("profile updates left in the outbox, relaying again later: %s", exc)
                self.failed = self._from_table = True
                return

    async def settle(self) -> None:
        """Wait for the relay in flight (what it cannot send waits for the next start)."""
        if self._task is not None:
            await self._task


def _set_aside(rejected: str, result: BatchResult) -> list[Record]:
    """The rejected-topic records for the events a batch stored nowhere."""
    return [
        Record(rejected, None, orjson.dumps({"reason": _UNIDENTIFIED, "event": e}))
        for e in result.unidentified
    ] + [  # only where it came from: it names a person who asked to be erased
        Record(rejected, None, orjson.dumps({"reason": "suppressed", **_origin(e)}))
        for e in result.suppressed
    ]


class _Resolver:
    """The resolver's :class:`cdp_stream.consuming.Stage`."""

    def __init__(
        self,
        bus: Bus,
        engine: AsyncEngine,
        settings: Settings,
        dead: DeadLetters,
        stop: asyncio.Event,
    ) -> None:
        self._bus, self._engine, self._settings, self._stop = bus, engine, settings, stop
        self._names, self._rules = settings.topics, IdentityRules.from_settings(settings)
        self._clock = asyncio.get_running_loop().time
        self._vacuumed_at = self._clock()
        self.relay = _Relay(engine, bus, self._names.profile_updates, dead)

    async def decode(self, messages: Sequence[Message]) -> list[tuple[Message, _Item]]:
        return await _decode_prepared(self._bus, self._names.rejected, messages, self._rules)

    async def apply(
        self, batch: Sequence[tuple[Message, _Item]], wait: bool
    ) -> list[tuple[Message, _Item]]:
        """The batch in one transaction; not waiting, the events of people another
        resolver holds are returned, prepared, for the next batch."""
        rules = self._rules
        prepared = [
            p if p is not None else prepare([e], rules, [m.value])[0] for m, (e, p) in batch
        ]
        result = await _apply(self._engine, prepared, rules, self._stop, wait)
        self.relay.hand(result.updates)
        await self._bus.publish_many(_set_aside(self._names.rejected, result))
        log.debug(
            "batch: %d stored, %d duplicates, %d held back",
            result.stored,
            result.duplicates,
            len(result.held),
        )
        held = {id(p) for p in result.held}
        pairs = zip(batch, prepared, strict=True)
        return [(m, (e, p)) for (m, (e, _)), p in pairs if id(p) in held]

    async def between(self) -> None:
        if self._clock() - self._vacuumed_at >= self._settings.resolver_outbox_vacuum_s:
            await vacuum_outbox(self._engine)
            self.relay.sweep()
            self._vacuumed_at = self._clock()
        if self.relay.failed:
            self.relay.kick()

    async def applied(self) -> None:
        return None


def _count(result: BatchResult) -> None:
    """A committed batch in the resolver's metrics."""
    metrics.resolver_events.labels("stored").inc(result.stored)
    metrics.resolver_events.labels("duplicate").inc(result.duplicates)
    metrics.resolver_events.labels("held_back").inc(len(result.held))
    metrics.profile_merges.inc(result.merges)
    metrics.identity_refusals.inc(result.refusals)
    set_aside = (("unidentified", result.unidentified), ("suppressed", result.suppressed))
    for reason, events in set_aside:
        for e in events:
            metrics.events_rejected.labels("resolver", str(e.get("sourceId")), reason).inc()


async def run_resolver(
    bus: Bus, engine: AsyncEngine, settings: Settings, stop: asyncio.Event
) -> None:
    """poll a batch -> one transaction (a poison event bisected out and dead-lettered) ->
    the events set aside to the rejected topic -> commit offsets; the outbox relayed beside."""
    logs.set_stage("resolver")
    names, rules = settings.topics, IdentityRules.from_settings(settings)
    dead = DeadLetters(bus, engine, names.dead_letters, "resolver", stop)
    try:  # rows sealed by an old key, or by none (before keys existed): the current one
        resealed = await retrying(engine, lambda conn: rekey(conn, rules.suppression), stop)
    except Stopping:
        return
    if resealed:
        log.info("sealed %d suppression rows with the current key", resealed)
    resolver = _Resolver(bus, engine, settings, dead, stop)
    resolver.relay.kick()  # what a crash left behind
    polling = Polling(
        settings.resolver_batch_size,
        settings.resolver_poll_timeout_ms,
        settings.resolver_linger_ms,
    )
    try:
        await run_consumer(bus, names.resolver_group, [names.events], resolver, polling, dead, stop)
    finally:
        await resolver.relay.settle()
