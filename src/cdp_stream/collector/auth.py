"""Write-key authentication: HTTP Basic username (empty password) or ``writeKey`` in the body.

Keys are looked up in Postgres and cached briefly, so a busy collector does not ask the
database on every request; unknown keys are cached for less time, so a newly created
source works within seconds.
"""

from __future__ import annotations

import base64
import binascii
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.credentials import source_for_write_key

_KNOWN_TTL_S = 60.0
_UNKNOWN_TTL_S = 2.0


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


class WriteKeys:
    """write key -> source id, with a small time-bounded cache in front of Postgres."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def source_id(self, write_key: str) -> str | None:
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
