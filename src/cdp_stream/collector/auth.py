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
  seconds;
- at most ``max_keys`` keys are held: a flood of random keys evicts the least recently
  used ones, not the keys in use (``cdp_stream.caching``, the API's tokens' cache too).

The field test that motivated this: on expiry every in-flight request queried Postgres at
once, exhausted the pool and was answered 500. The same memory answers CORS preflights
(any source's origins).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.caching import Recall
from cdp_stream.collector.cors import origin_allowed
from cdp_stream.profiles.credentials import Source, all_allowed_origins, source_for_write_key

T = TypeVar("T")

_MAX_KEYS = 10_000  # bound memory under a flood of random keys: the least recently used go


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
        max_keys: int = _MAX_KEYS,
    ) -> None:
        self._engine = engine
        self._by_key: Recall[str, Source | None] = Recall(
            self._fetch,
            ttl=lambda source: known_ttl_s if source else unknown_ttl_s,
            maxsize=max_keys,
            stale_retry_s=unknown_ttl_s,
            what="write key",
        )
        self._origins: Recall[None, frozenset[str]] = Recall(
            self._fetch_origins,
            ttl=lambda _: origins_ttl_s,
            maxsize=1,
            stale_retry_s=unknown_ttl_s,
            what="allowed origins",
        )
        self.queries = 0  # database round trips made, for tests and the curious

    async def by_write_key(self, write_key: str) -> Source | None:
        """The key's source (None: unknown). Raises the database's error only when the key
        is not in memory at all and the lookup fails."""
        if "\x00" in write_key:  # no key holds NUL; Postgres would refuse the query
            return None
        return await self._by_key.get(write_key)

    async def _fetch(self, write_key: str) -> Source | None:
        return await self._query(lambda conn: source_for_write_key(conn, write_key))

    async def any_allows(self, origin: str) -> bool:
        """Whether some source lists ``origin`` (a preflight names no write key); stale
        patterns are served while one refresh runs, as for write keys."""
        return origin_allowed(origin, await self._origins.get(None))

    async def _fetch_origins(self, _: None) -> frozenset[str]:
        return frozenset(await self._query(all_allowed_origins))

    async def _query(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        self.queries += 1
        async with self._engine.connect() as conn:
            return await work(conn)
