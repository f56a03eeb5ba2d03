"""The consumer runtime both consumer groups run on (the resolver on ``cdp.events``,
activation on ``cdp.profile-updates``): poll -> decode -> apply in one transaction ->
commit, with the same rejoin, stop, dead-letter path, timing metrics and log context.

A stage gives a :class:`Stage`: how to decode a batch of records into its typed messages
(what it cannot decode it parks or rejects itself), how to apply a batch of those in one
transaction, and what to do between batches. The runtime does the rest, in this order,
and why:

1. **poll** (``bus.base.fill``: up to ``batch_size`` records, lingering for a fuller
   batch) and **decode**, for the next batch *while the current one is applied*
   (:class:`_Ahead`): decoding needs no lock, so Python and Postgres overlap.
2. **apply** the batch (the stage's one transaction); a record that can never be applied
   is bisected out and parked on ``cdp.dead-letters`` (:mod:`cdp_stream.poison`); an
   outage propagates and the batch is retried whole. A stage may hold records back
   rather than wait for another consumer's transaction (the resolver: events of people
   another resolver has locked); they go into the next batch, and a record held back
   :data:`HOLD_ROUNDS` times, or when a poll finds nothing new, is applied waiting.
3. **commit** the offsets, only after the transaction, and per partition never past a
   record held back: a crash before it redelivers the batch (and the one taken ahead, and
   what was held), which the stages' applies turn into no-ops.

The bus failing mid-batch: leave the group and rejoin, so the next batch starts at the
committed offsets (the batch taken ahead is dropped). The database away past a stop:
``Stopping``, the batch is redelivered later. ``stop`` set: finish or drop the batch in
hand, leave the group. Each step is timed (``cdp_consumer_step_duration_seconds``) and
the lag of each partition the member owns is refreshed every :data:`LAG_EVERY_S`.
Not here: what a stage does with its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from cdp_stream import heap, logs, metrics
from cdp_stream.bus.base import (
    Bus,
    BusUnavailable,
    Consumer,
    Message,
    TopicPartition,
    fill,
    next_offsets,
    rejoin,
)
from cdp_stream.poison import DeadLetters, apply_isolating
from cdp_stream.retry import Stopping

log = logging.getLogger(__name__)
T = TypeVar("T")

LAG_EVERY_S = 5.0

# A record held back this many times is applied waiting, so that one always shared with
# another consumer's batches is not held back for ever (nor its partition's offset).
HOLD_ROUNDS = 3


class Stage(Protocol[T]):
    """What one consumer group does with its records."""

    async def decode(self, messages: Sequence[Message]) -> list[tuple[Message, T]]:
        """The typed messages of a polled batch, each with its record. A record that is
        not one is parked or rejected here and left out (its offset is still committed)."""

    async def apply(
        self, batch: Sequence[tuple[Message, T]], wait: bool
    ) -> Sequence[tuple[Message, T]]:
        """Apply the batch in one transaction; raise to have it bisected (poison) or,
        for an outage, retried whole. Unless ``wait``, it may return items it held back
        instead of waiting for what another consumer's transaction holds: they come
        again with the next batch."""

    async def between(self) -> None:
        """Housekeeping between two batches (and after a poll that found nothing)."""

    async def applied(self) -> None:
        """The batch's transaction committed (before its offsets are)."""


@dataclass(frozen=True)
class Polling:
    """How a group polls: records per batch, the first wait, the linger for more."""

    batch_size: int
    timeout_ms: int
    linger_ms: int


_Taken = tuple[list[Message], list[tuple[Message, T]]]


class _Ahead(Generic[T]):
    """One batch taken (polled and decoded) ahead while the current one is applied.
    Batches are still applied, and their offsets committed, one at a time and in order;
    a batch taken ahead and then dropped (a rejoin, stopping) was not committed, so it is
    delivered again."""

    def __init__(self, take: Callable[[], Awaitable[_Taken[T] | None]]) -> None:
        self._take = take
        self._task: asyncio.Task[_Taken[T] | None] | None = None

    async def _run(self) -> _Taken[T] | None:
        return await self._take()

    async def next(self) -> _Taken[T] | None:
        """The batch taken ahead (or one taken now), and the next one started."""
        task, self._task = self._task, None
        taken = await (task if task is not None else self._take())
        if taken is not None:
            self._task = asyncio.create_task(self._run())
        return taken

    async def drop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _Timed:
    """Observes a block's duration as one step of one group."""

    def __init__(self, group: str) -> None:
        self._steps = {
            step: metrics.consumer_step_duration.labels(group, step)
            for step in ("poll", "decode", "apply", "commit")
        }

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._steps[step].observe(time.perf_counter() - started)


def _at(m: Message) -> tuple[str, int, int]:
    """A record's position: what identifies it across the batches it is held back from."""
    return m.topic, m.partition, m.offset


class _Held(Generic[T]):
    """The items a stage held back, each with how many times, and the offsets that may be
    committed: per partition the first held item's, or past the last record taken."""

    def __init__(self) -> None:
        # times held back, by record: a stage may return its held items as new objects
        self._times: dict[tuple[str, int, int], int] = {}
        self._items: list[tuple[Message, T]] = []
        self._next: dict[TopicPartition, int] = {}  # past the last record taken
        self._was_held: set[TopicPartition] = set()  # partitions of items held last round

    def __bool__(self) -> bool:
        return bool(self._items)

    def due(
        self, items: list[tuple[Message, T]], idle: bool
    ) -> tuple[list[tuple[Message, T]], list[tuple[Message, T]]]:
        """This round's items: those to apply waiting (held back :data:`HOLD_ROUNDS` times,
        or all of them when the poll found nothing new) and the rest, the held ones first."""
        before, self._items = self._items, []
        counted = [(i, self._times[_at(i[0])]) for i in before]
        patient = [i for i, n in counted if idle or n >= HOLD_ROUNDS]
        again = [(i, n) for i, n in counted if not idle and n < HOLD_ROUNDS]
        self._times = {_at(i[0]): n for i, n in again}
        return patient, [i for i, _ in again] + items

    def applier(
        self, stage: Stage[T], wait: bool
    ) -> Callable[[Sequence[tuple[Message, T]]], Awaitable[None]]:
        async def apply(batch: Sequence[tuple[Message, T]]) -> None:
            back = await stage.apply(batch, wait)
            for m, _ in back:
                self._times[_at(m)] = self._times.get(_at(m), 0) + 1
            self._items += back

        return apply

    def offsets(self, messages: Sequence[Message]) -> dict[TopicPartition, int]:
        """The offsets to commit after this round (``messages``: the records it took), for
        the partitions it took records of or had held some back."""
        taken = next_offsets(messages)
        for tp, offset in taken.items():
            self._next[tp] = max(self._next.get(tp, 0), offset)
        commit = {tp: self._next[tp] for tp in self._was_held | set(taken)}
        for m, _ in self._items:
            tp = (m.topic, m.partition)
            commit[tp] = min(commit[tp], m.offset)
        self._was_held = {(m.topic, m.partition) for m, _ in self._items}
        return commit


async def _track_lag(consumer: Consumer, group: str, stop: asyncio.Event) -> None:
    """Refresh ``cdp_consumer_lag`` for the partitions this member owns, every
    :data:`LAG_EVERY_S`; partitions it no longer owns are dropped from the gauge.
    ``group`` is the stage's name (as every ``group`` label), not the namespaced one."""
    shown: set[tuple[str, int]] = set()
    while not stop.is_set():
        try:
            lag = await consumer.lag()
        except (BusUnavailable, RuntimeError) as exc:  # away, or between a leave and a join
            log.debug("lag not measured: %s", exc)
            lag = {}
        except Exception:  # a metric must never stop the consumer; say why it is missing
            log.warning("lag not measured", exc_info=True)
            lag = {}
        for topic, partition in shown - set(lag):
            metrics.consumer_lag.remove(group, topic, str(partition))
        for (topic, partition), behind in lag.items():
            metrics.consumer_lag.labels(group, topic, str(partition)).set(behind)
        shown = set(lag)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LAG_EVERY_S)


async def run_consumer(
    bus: Bus,
    group: str,
    topics: Sequence[str],
    stage: Stage[T],
    polling: Polling,
    dead: DeadLetters,
    stop: asyncio.Event,
) -> None:
    """poll (ahead) -> decode -> apply in one transaction -> commit, until ``stop``.
    ``dead.consumer`` names the stage in metrics and logs."""
    name = dead.consumer
    logs.set_stage(name)
    timed = _Timed(name)
    batch_records = metrics.consumer_batch_records.labels(name)
    records = metrics.consumer_records.labels(name)
    consumer = bus.consumer(group, topics, polling.linger_ms)

    async def take() -> _Taken[T] | None:
        with timed("poll"):
            messages = await fill(consumer, polling.batch_size, polling.timeout_ms)
        if not messages:
            return None
        batch_records.observe(len(messages))
        with timed("decode"):
            return messages, await stage.decode(messages)

    async def park(item: tuple[Message, T], exc: Exception) -> None:
        await dead.park_message(item[0], exc)

    await consumer.start()
    heap.settle()
    ahead: _Ahead[T] = _Ahead(take)
    held = _Held[T]()
    lag = asyncio.create_task(_track_lag(consumer, name, stop))
    try:
        while not stop.is_set():
            await stage.between()
            try:
                taken = await ahead.next()
                if taken is None and not held:
                    continue
                messages, items = taken or ([], [])
                with timed("apply"), heap.paused():
                    patient, eager = held.due(items, idle=taken is None)
                    if patient:
                        await apply_isolating(patient, held.applier(stage, wait=True), park)
                    if eager:
                        await apply_isolating(eager, held.applier(stage, wait=False), park)
                    # The batch dies here, by reference counting, while collections are
                    # still paused: the collection that resumes them walks only what lives
                    # on (the batch taken ahead), not the hundreds of thousands of
                    # containers of the one just applied.
                    del taken, items, patient, eager
                await stage.applied()
                with timed("commit"):
                    await consumer.commit(held.offsets(messages))
                records.inc(len(messages))
            except BusUnavailable as exc:
                log.warning("bus unavailable, rejoining from the committed offsets: %s", exc)
                metrics.consumer_rejoins.labels(name).inc()
                await ahead.drop()
                held = _Held()
                await rejoin(consumer, stop)
            except Stopping:
                log.info("stopping with the database away: the batch is redelivered later")
    finally:
        lag.cancel()
        await ahead.drop()
        await asyncio.gather(lag, return_exceptions=True)
        await consumer.stop()
