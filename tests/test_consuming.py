"""The consumer runtime (``cdp_stream.consuming``) with a stage of its own on the real
broker and server: every record decoded and applied once, in batches, its offsets
committed (lag 0); a record that cannot be decoded and one that cannot be applied both
parked on the dead-letter topic while the rest go on; each step timed; ``stop`` ends it.
A stage that holds records back gets them again, no offset is committed past them, and
one held back every time it is offered is applied waiting, also when the stage hands it
back as a new object (as the resolver does). A batch is freed before collections resume."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from cdp_stream.app import Runtime
from cdp_stream.bus.base import Bus, Consumer, Message, Record, TopicPartition
from cdp_stream.consuming import HOLD_ROUNDS, Polling, _Held, run_consumer
from cdp_stream.metrics import REGISTRY
from cdp_stream.poison import DeadLetters
from cdp_stream.settings import Settings
from tests.support import eventually, uid

GROUP = "test-runtime"


class Numbers:
    """A stage: each record's value is a number; "13" can never be applied, "x" is not a
    number at all."""

    def __init__(self, dead: DeadLetters) -> None:
        self.dead = dead
        self.done: list[int] = []
        self.batches = 0
        self.commits_seen = 0

    async def decode(self, messages: Sequence[Message]) -> list[tuple[Message, int]]:
        out = []
        for m in messages:
            try:
                out.append((m, int(m.value)))
            except ValueError as exc:
                await self.dead.park_message(m, exc)
        return out

    async def apply(
        self, batch: Sequence[tuple[Message, int]], wait: bool
    ) -> Sequence[tuple[Message, int]]:
        if any(n == 13 for _, n in batch):
            raise ValueError("13 is never applied")
        self.done += [n for _, n in batch]
        self.batches += 1
        return ()

    async def between(self) -> None:
        return None

    async def applied(self) -> None:
        self.commits_seen += 1


@pytest.fixture
async def runtime(kafka_bootstrap: str, pg_url: str) -> AsyncIterator[Runtime]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=pg_url,
        topic_partitions=3,
        topic_namespace=f"test-{uid()}.",
    )
    runtime = await Runtime.start(settings, "test-runtime")
    yield runtime
    await runtime.stop()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _lag(topic: str) -> list[float]:
    return [
        s.value
        for family in REGISTRY.collect()
        if family.name == "cdp_consumer_lag"
        for s in family.samples
        if s.labels["group"] == GROUP and s.labels["topic"] == topic
    ]


async def test_every_record_applied_once_and_the_bad_ones_parked(runtime: Runtime) -> None:
    names, stop = runtime.settings.topics, asyncio.Event()
    dead = DeadLetters(runtime.bus, runtime.engine, names.dead_letters, GROUP, stop)
    stage = Numbers(dead)
    values = [str(i).encode() for i in range(200) if i != 13] + [b"13", b"x"]
    await runtime.bus.publish_many([Record(names.events, v, v) for v in values])
    steps = ("poll", "decode", "apply", "commit")
    timed = {
        s: _sample("cdp_consumer_step_duration_seconds_count", group=GROUP, step=s) for s in steps
    }
    parked = _sample("cdp_dead_letters_total", consumer=GROUP)
    polling = Polling(batch_size=50, timeout_ms=100, linger_ms=10)
    group = f"{names.namespace}{GROUP}"
    task = asyncio.create_task(
        run_consumer(runtime.bus, group, [names.events], stage, polling, dead, stop)
    )

    async def settled() -> bool:
        all_parked = _sample("cdp_dead_letters_total", consumer=GROUP) == parked + 2
        lag = _lag(names.events)
        return len(stage.done) == 199 and all_parked and len(lag) == 3 and not any(lag)

    try:
        assert await eventually(settled, within_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert task.result() is None  # stopped, not failed
    assert sorted(stage.done) == [i for i in range(200) if i != 13]
    assert stage.batches >= 4 and stage.commits_seen >= 4  # at most 50 records a batch
    for step, count in timed.items():
        assert _sample("cdp_consumer_step_duration_seconds_count", group=GROUP, step=step) > count
    assert _sample("cdp_consumer_records_total", group=GROUP) >= 201


class Commits:
    """A bus whose consumers record every commit they are asked for."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.seen: list[dict[TopicPartition, int]] = []

    def consumer(self, group: str, topics: Sequence[str], linger_ms: int = 0) -> Consumer:
        inner = self.bus.consumer(group, topics, linger_ms)
        seen = self.seen

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
                seen.append(dict(offsets))
                await inner.commit(offsets)

        return Recording()  # type: ignore[return-value]


class Holding(Numbers):
    """Holds back, when not asked to wait, each multiple of 7 the first time it is offered,
    and 99 every time; notes how many commits there were when it applied 99."""

    def __init__(self, dead: DeadLetters, commits: Commits) -> None:
        super().__init__(dead)
        self.commits = commits
        self.offered: dict[int, int] = {}
        self.where: dict[int, tuple[TopicPartition, int]] = {}
        self.commits_before_99: int | None = None

    async def apply(
        self, batch: Sequence[tuple[Message, int]], wait: bool
    ) -> Sequence[tuple[Message, int]]:
        back = []
        for item in batch:
            m, n = item
            self.where[n] = ((m.topic, m.partition), m.offset)
            self.offered[n] = self.offered.get(n, 0) + 1
            if not wait and (n == 99 or (n % 7 == 0 and self.offered[n] == 1)):
                back.append(item)
            elif n == 99:
                self.commits_before_99 = len(self.commits.seen)
        await super().apply([item for item in batch if item not in back], wait)
        return back


async def test_records_held_back_come_again_and_hold_their_offsets(runtime: Runtime) -> None:
    names, stop = runtime.settings.topics, asyncio.Event()
    dead = DeadLetters(runtime.bus, runtime.engine, names.dead_letters, GROUP, stop)
    bus = Commits(runtime.bus)
    stage = Holding(dead, bus)
    values = [str(i).encode() for i in range(100) if i != 13]
    await runtime.bus.publish_many([Record(names.events, v, v) for v in values])
    polling = Polling(batch_size=20, timeout_ms=100, linger_ms=10)
    group = f"{names.namespace}{GROUP}"
    task = asyncio.create_task(
        run_consumer(bus, group, [names.events], stage, polling, dead, stop)  # type: ignore[arg-type]
    )

    async def settled() -> bool:
        lag = _lag(names.events)
        return len(stage.done) == 99 and len(lag) == 3 and not any(lag)

    try:
        assert await eventually(settled, within_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sorted(stage.done) == [i for i in range(100) if i != 13]  # each exactly once
    assert all(stage.offered[n] == 2 for n in range(7, 99, 7))  # held back once, then taken
    # 99 was held back every time it was offered without waiting, then applied waiting:
    # after HOLD_ROUNDS holds, or sooner when a poll found nothing new.
    assert stage.commits_before_99 is not None and 2 <= stage.offered[99] <= HOLD_ROUNDS + 1
    # While it was held, its partition's commits stopped at it; then they went past it.
    tp, offset = stage.where[99]
    before = [c[tp] for c in bus.seen[: stage.commits_before_99] if tp in c]
    after = [c[tp] for c in bus.seen[stage.commits_before_99 :] if tp in c]
    assert before and all(o <= offset for o in before)
    assert after == [offset + 1]


class Copying:
    """A stage that holds back every record when not asked to wait, handing each back as a
    new (record, item) pair, as the resolver does with the events it holds back."""

    def __init__(self) -> None:
        self.waited: list[int] = []

    async def apply(
        self, batch: Sequence[tuple[Message, int]], wait: bool
    ) -> Sequence[tuple[Message, int]]:
        if wait:
            self.waited += [n for _, n in batch]
            return []
        return [(m, n) for m, n in batch]


async def test_a_record_handed_back_as_a_new_object_is_applied_waiting_after_its_rounds() -> None:
    """Rounds are counted by record, not by the object the stage returned: while every
    poll finds something new (not idle), a record held back HOLD_ROUNDS times is applied
    waiting in the next round, and not before."""
    held, stage = _Held[int](), Copying()
    fresh = (Message("t", 0, i, None, b"") for i in range(1, 100))
    items = [(Message("t", 0, 0, None, b""), 0)]
    for _ in range(HOLD_ROUNDS):
        patient, eager = held.due(items, idle=False)
        assert not patient
        await held.applier(stage, wait=False)(eager)  # type: ignore[arg-type]
        items = [(next(fresh), 1)]  # the poll found a new record every round
    patient, eager = held.due(items, idle=False)
    await held.applier(stage, wait=True)(patient)  # type: ignore[arg-type]
    assert stage.waited == [0]
    assert 0 not in [n for _, n in eager]  # applied once: not offered again


class Item:
    """A decoded record that notes, as it dies, whether collections were running."""

    __slots__ = ("collecting", "n")

    def __init__(self, n: int, collecting: dict[int, bool]) -> None:
        self.n, self.collecting = n, collecting

    def __del__(self) -> None:
        self.collecting[self.n] = gc.isenabled()


class Tracked(Numbers):
    """Decodes each record into an :class:`Item`."""

    def __init__(self, dead: DeadLetters) -> None:
        super().__init__(dead)
        self.collecting: dict[int, bool] = {}  # n -> collections running when it died

    async def decode(self, messages: Sequence[Message]) -> list[tuple[Message, Item]]:  # type: ignore[override]
        return [(m, Item(int(m.value), self.collecting)) for m in messages]

    async def apply(  # type: ignore[override]
        self, batch: Sequence[tuple[Message, Item]], wait: bool
    ) -> Sequence[tuple[Message, Item]]:
        self.done += [item.n for _, item in batch]
        return ()


async def test_a_batch_is_freed_while_collections_are_still_paused(runtime: Runtime) -> None:
    """The runtime drops its references to a batch before it resumes collections, so the
    collection that follows does not walk the batch it just applied."""
    names, stop = runtime.settings.topics, asyncio.Event()
    dead = DeadLetters(runtime.bus, runtime.engine, names.dead_letters, GROUP, stop)
    stage = Tracked(dead)
    values = [str(i).encode() for i in range(100)]
    await runtime.bus.publish_many([Record(names.events, v, v) for v in values])
    polling = Polling(batch_size=20, timeout_ms=100, linger_ms=10)
    group = f"{names.namespace}{GROUP}"
    task = asyncio.create_task(
        run_consumer(runtime.bus, group, [names.events], stage, polling, dead, stop)  # type: ignore[arg-type]
    )

    async def applied() -> bool:
        return len(stage.done) == 100

    try:
        assert await eventually(applied, within_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sorted(stage.done) == list(range(100))
    assert {n: stage.collecting.get(n) for n in stage.done} == dict.fromkeys(range(100), False)
