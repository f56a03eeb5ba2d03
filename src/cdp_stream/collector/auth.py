"""Write-key authentication: HTTP Basic username (empty password) or ``writeKey`` in the body.

Sources are looked up in Postgres and cached briefly, so a busy collector does not ask the
database on every request; unknown keys are cached for less time, so a newly created
source works within seconds. The same cache answers CORS preflights (any source's origins).
"""

from __future__ import annotations

import base64
import binascii
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.collector.cors import origin_allowed
from cdp_stream.profiles.credentials import Source, all_allowed_origins, source_for_write_key

_KNOWN_TTL_S = 60.0
_UNKNOWN_TTL_S = 2.0
_ORIGINS_TTL_S = 10.0


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
    """write key -> source, and every allowed origin, with time-bounded caches in front of
    Postgres."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._cache: dict[str, tuple[Source | None, float]] = {}
        self._origins: tuple[set[str], float] = (set(), 0.0)

    async def by_write_key(self, write_key: str) -> Source | None:
        now = time.monotonic()
        hit = self._cache.get(write_key)
        if hit is not None and hit[1] > now:
            return hit[0]
        async with self._engine.connect() as conn:
            source = await source_for_write_key(conn, write_key)
        if len(self._cache) > 10_000:  # bound memory under a flood of random keys
            self._cache.clear()
        ttl = _KNOWN_TTL_S if source else _UNKNOWN_TTL_S
        self._cache[write_key] = (source, now + ttl)
        return source

    async def any_allows(self, origin: str) -> bool:
        """Whether some source lists ``origin`` (a preflight names no write key)."""
        now = time.monotonic()
        patterns, expires = self._origins
        if expires <= now:
            async with self._engine.connect() as conn:
                patterns = await all_allowed_origins(conn)
            self._origins = (patterns, now + _ORIGINS_TTL_S)
        return origin_allowed(origin, patterns)
