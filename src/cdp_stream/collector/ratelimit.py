"""Rate limits on the public write key: one token bucket per source, in this process.

A write key is public (every page carries it), so one script could flood a source. Each
source's bucket holds up to ``burst`` tokens and refills at ``rate`` per second (the
source's own ``rate_limit_per_s``/``rate_limit_burst``, else the Settings defaults
``CDP_RATE_LIMIT_PER_S``/``CDP_RATE_LIMIT_BURST``; a rate of 0 means no limit).

Decisions:

* **Events, not requests.** A request costs one token per event: a ``/v1/batch`` of 100
  costs 100, so batching saves round trips, not quota. A batch larger than ``burst`` is
  admitted when the bucket is full and leaves it in debt (negative), which the refill pays
  back before the next request: never refused forever, and still ``rate`` on average.
* **Refused requests cost nothing** and are answered 429 with ``Retry-After``: the whole
  seconds until the bucket holds what this request needs (rounded up, at least 1). Nothing
  of a refused request is published; the client sends it again (the SDKs and ``cdp.js`` do).
* **Per process.** The buckets live in this collector process's memory, so the hot path
  costs a dict lookup and some arithmetic (no database, no network). With N collector
  processes (``CDP_COLLECTOR_WORKERS``, replicas) the effective limit is up to N times the
  configured one; a shared bucket (Redis, Postgres) would cost a round trip per request,
  and the purpose -- stopping a flood from one page's key -- does not need exactness. Set
  the rate per source divided by N when that matters.
* Limits are read with the source from the write-key cache (``auth.Sources``), so a change
  through ``/v1/sources`` applies within its TTL (60 s), without a restart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cdp_stream.profiles.credentials import Source
from cdp_stream.settings import Settings


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimits:
    """The token buckets of the sources this process has seen."""

    def __init__(
        self,
        default_rate: float,
        default_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = default_rate
        self._burst = default_burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        return cls(settings.rate_limit_per_s, settings.rate_limit_burst)

    def take(self, source: Source, cost: int) -> int:
        """Spend ``cost`` tokens of the source's bucket: 0 when admitted, else the seconds
        (Retry-After) until it could be, and nothing spent."""
        rate = self._rate if source.rate_limit_per_s is None else source.rate_limit_per_s
        if rate <= 0:
            return 0
        burst = self._burst if source.rate_limit_burst is None else source.rate_limit_burst
        now = self._clock()
        bucket = self._buckets.get(source.id)
        if bucket is None:
            bucket = self._buckets[source.id] = _Bucket(float(burst), now)
        tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        needed = min(cost, burst)  # a batch over the burst goes into debt (module docstring)
        if tokens >= needed:
            bucket.tokens = tokens - cost
            return 0
        bucket.tokens = tokens
        return max(1, math.ceil((needed - tokens) / rate))
