"""Answers of a slow lookup kept in memory: the one cache in front of the database for the
collector's write keys and allowed origins and the API's tokens.

- Bounded: an LRU of ``maxsize`` keys (cachetools), so a flood of random keys evicts the
  least recently used answers one by one, never the busy ones all at once.
- Single flight: a key not in memory is looked up once however many ask at that moment;
  they all await the one lookup, and its failure (pool timeout, outage) reaches each.
- Each answer is kept for ``ttl(answer)`` seconds. Then, with ``stale_retry_s`` set, it
  is still served while one refresh runs in the background (an expiry never makes a
  request wait), and a refresh that fails keeps it, tried again ``stale_retry_s`` later;
  without, the next ask waits for a fresh answer (a revoked credential stops working).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cachetools import LRUCache

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Answer(Generic[V]):
    value: V
    expires: float


class Recall(Generic[K, V]):
    """key -> ``fetch(key)``, from memory (see the module docstring)."""

    def __init__(
        self,
        fetch: Callable[[K], Coroutine[Any, Any, V]],
        *,
        ttl: Callable[[V], float],
        maxsize: int,
        stale_retry_s: float | None = None,
        what: str = "lookup",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch, self._ttl, self._stale_retry = fetch, ttl, stale_retry_s
        self._what, self._clock = what, clock
        self._answers: LRUCache[K, _Answer[V]] = LRUCache(maxsize)
        self._lookups: dict[K, asyncio.Task[V]] = {}

    async def get(self, key: K) -> V:
        """The answer for ``key``; raises the lookup's error only when it has to wait for
        one (nothing in memory, or an expired answer that is not served stale)."""
        try:
            answer = self._answers[key]
        except KeyError:
            return await asyncio.shield(self._lookup(key))
        if answer.expires <= self._clock():
            if self._stale_retry is None:
                return await asyncio.shield(self._lookup(key))
            self._lookup(key)  # in the background; the stale answer is served
        return answer.value

    def _lookup(self, key: K) -> asyncio.Task[V]:
        """The one lookup of ``key`` in flight, started if there is none."""
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key))
            self._lookups[key] = task
            task.add_done_callback(functools.partial(self._looked_up, key))
        return task

    def _looked_up(self, key: K, task: asyncio.Task[V]) -> None:
        del self._lookups[key]
        now = self._clock()
        if (failure := _failure(task)) is None:
            value = task.result()
            self._answers[key] = _Answer(value, now + self._ttl(value))
        elif self._stale_retry is not None and (stale := self._answers.get(key)) is not None:
            log.warning("%s refresh failed, serving the cached answer: %s", self._what, failure)
            stale.expires = now + self._stale_retry


def _failure(task: asyncio.Task[object]) -> str | None:
    """Why a finished lookup failed (None: it did not); marks its exception retrieved."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return None if exc is None else repr(exc)
