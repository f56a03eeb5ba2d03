"""The in-memory lookup cache, pure: a fake lookup and an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from cdp_stream.caching import Recall


class Lookup:
    """Answers ``key * 10`` from ``answer``; fails while ``failing``; waits for ``gate``."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing = False
        self.answer = 10

    async def __call__(self, key: int) -> int:
        self.calls.append(key)
        await self.gate.wait()
        if self.failing:
            raise ConnectionError("database away")
        return key * self.answer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_one_lookup_however_many_ask_and_its_failure_reaches_each() -> None:
    lookup = Lookup()
    recall = Recall(lookup, ttl=lambda _: 60.0, maxsize=10)
    lookup.gate.clear()
    asks = [asyncio.create_task(recall.get(1)) for _ in range(50)]
    await settle()
    lookup.gate.set()
    assert await asyncio.gather(*asks) == [10] * 50
    assert lookup.calls == [1]
    lookup.failing = True
    failed = await asyncio.gather(*(recall.get(2) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(f, ConnectionError) for f in failed) and lookup.calls == [1, 2]


async def test_an_expired_answer_is_served_while_it_refreshes_and_kept_if_that_fails() -> None:
    lookup, clock = Lookup(), Clock()
    recall = Recall(lookup, ttl=lambda _: 60.0, maxsize=10, stale_retry_s=2.0, clock=clock)
    assert await recall.get(1) == 10
    clock.now, lookup.failing = 61.0, True
    assert [await recall.get(1) for _ in range(3)] == [10] * 3  # stale, one refresh
    await settle()
    assert lookup.calls == [1, 1]
    assert await recall.get(1) == 10  # the failure kept it, retried 2 s later only
    await settle()
    assert lookup.calls == [1, 1]
    clock.now, lookup.failing, lookup.answer = 63.5, False, 20
    assert await recall.get(1) == 10
    await settle()
    assert await recall.get(1) == 20 and lookup.calls == [1, 1, 1]


async def test_without_stale_an_expired_answer_waits_for_a_fresh_one() -> None:
    lookup, clock = Lookup(), Clock()
    recall = Recall(lookup, ttl=lambda _: 5.0, maxsize=10, clock=clock)
    assert await recall.get(1) == 10
    clock.now, lookup.answer = 5.0, 30
    assert await recall.get(1) == 30
    clock.now, lookup.failing = 10.0, True
    with pytest.raises(ConnectionError):
        await recall.get(1)


async def test_the_ttl_depends_on_the_answer() -> None:
    lookup, clock = Lookup(), Clock()
    recall = Recall(lookup, ttl=lambda v: 60.0 if v else 2.0, maxsize=10, clock=clock)
    await recall.get(0)
    await recall.get(1)
    clock.now = 3.0
    await recall.get(0)
    await recall.get(1)
    assert lookup.calls == [0, 1, 0]


async def test_full_it_evicts_the_least_recently_used_one_at_a_time() -> None:
    lookup = Lookup()
    recall = Recall(lookup, ttl=lambda _: 60.0, maxsize=3)
    for key in (1, 2, 3):
        await recall.get(key)
    await recall.get(1)  # 2 is now the least recently used
    await recall.get(4)
    lookup.calls.clear()
    for key in (1, 3, 4):
        await recall.get(key)
    assert lookup.calls == []  # all still held
    await recall.get(2)
    assert lookup.calls == [2]
