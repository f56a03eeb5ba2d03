"""Write-key authentication: HTTP Basic username (empty password) or ``writeKey`` in the body.

Sources are served from memory, so a busy collector does not ask the database per request
and keeps accepting events while Postgres is slow or down:

- a known key is kept ``known_ttl_s``; once expired it is still served while one refresh
  runs in the background (serve-stale-while-refreshing), so an expiry never makes requests
  wait, and a refresh that fails keeps the stale source (retried every ``unknown_ttl_s``);
- a key not in memory is looked up once however many requests ask at the same moment
  (single flight): they all await the one lookup, and its failure (pool timeout, outage)
  reaches each of them, answered 503 by the caller;
- unknown keys are remembered for ``unknown_ttl_s`` only, so a new source works within
  seconds.

The field test that motivated this: on expiry every in-flight request queried Postgres at
once, exhausted the pool and was answered 500. The same memory answers CORS preflights
(any source's origins).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.collector.cors import origin_allowed
from cdp_stream.profiles.credentials import Source, all_allowed_origins, source_for_write_key

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_KEYS = 10_000  # bound memory under a flood of random keys


def basic_username(authorization: str | None) -> str | None:
    """The username of an ``Authorization: Basic`` header (Segment's write-key form)."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


@dataclass(slots=True)
class _Entry:
    source: Source | None
    expires: float


class Sources:
    """write key -> source, and every allowed origin, from memory in front of Postgres
    (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        known_ttl_s: float = 60.0,
        unknown_ttl_s: float = 2.0,
        origins_ttl_s: float = 10.0,
    ) -> None:
        self._engine = engine
        self._known_ttl = known_ttl_s
        self._unknown_ttl = unknown_ttl_s
        self._origins_ttl = origins_ttl_s
        self._cache: dict[str, _Entry] = {}
        self._lookups: dict[str, asyncio.Task[Source | None]] = {}
        self._origins: tuple[frozenset[str], float] | None = None
        self._origins_lookup: asyncio.Task[frozenset[str]] | None = None
        self.queries = 0  # database round trips made, for tests and the curious

    async def by_write_key(self, write_key: str) -> Source | None:
        """The key's source (None: unknown). Raises the database's error only when the key
        is not in memory at all and the lookup fails."""
        if "\x00" in write_key:  # no key holds NUL; Postgres would refuse the query
            return None
        entry = self._cache.get(write_key)
        if entry is None:
            return await asyncio.shield(self._lookup(write_key))
        if entry.expires <= time.monotonic():
            self._lookup(write_key)  # in the background; the stale source is served
        return entry.source

    def _lookup(self, write_key: str) -> asyncio.Task[Source | None]:
        """The one lookup of ``write_key`` in flight, started if there is none."""
        task = self._lookups.get(write_key)
        if task is None:
            task = asyncio.create_task(self._fetch(write_key))
            self._lookups[write_key] = task
            task.add_done_callback(lambda t: self._looked_up(write_key, t))
        return task

    async def _fetch(self, write_key: str) -> Source | None:
        return await self._query(lambda conn: source_for_write_key(conn, write_key))

    def _looked_up(self, write_key: str, task: asyncio.Task[Source | None]) -> None:
        del self._lookups[write_key]
        now = time.monotonic()
        if (failure := _failure(task)) is not None:
            stale = self._cache.get(write_key)
            if stale is not None:  # keep serving it; try again a little later
                log.warning("write key refresh failed, serving the cached source: %s", failure)
                stale.expires = now + self._unknown_ttl
            return
        source = task.result()
        if len(self._cache) >= _MAX_KEYS and write_key not in self._cache:
            self._cache.clear()
        ttl = self._known_ttl if source else self._unknown_ttl
        self._cache[write_key] = _Entry(source, now + ttl)

    async def any_allows(self, origin: str) -> bool:
        """Whether some source lists ``origin`` (a preflight names no write key); stale
        patterns are served while one refresh runs, as for write keys."""
        cached = self._origins
        if cached is None or cached[1] <= time.monotonic():
            if self._origins_lookup is None:
                self._origins_lookup = asyncio.create_task(self._fetch_origins())
                self._origins_lookup.add_done_callback(self._origins_looked_up)
            if cached is None:
                return origin_allowed(origin, await asyncio.shield(self._origins_lookup))
        return origin_allowed(origin, cached[0])

    async def _fetch_origins(self) -> frozenset[str]:
        return frozenset(await self._query(all_allowed_origins))

    def _origins_looked_up(self, task: asyncio.Task[frozenset[str]]) -> None:
        self._origins_lookup = None
        now = time.monotonic()
        if (failure := _failure(task)) is None:
            self._origins = (task.result(), now + self._origins_ttl)
        elif self._origins is not None:
            log.warning("allowed origins refresh failed, serving the cached ones: %s", failure)
            self._origins = (self._origins[0], now + self._unknown_ttl)

    async def _query(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        self.queries += 1
        async with self._engine.connect() as conn:
            return await work(conn)


def _failure(task: asyncio.Task[object]) -> str | None:
    """Why a finished lookup failed (None: it did not); marks its exception retrieved."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return None if exc is None else repr(exc)
