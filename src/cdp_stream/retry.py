"""Retrying with backoff: the one loop every retry in the server runs on, and the one
formula of its delays.

Callers say which failures are worth another attempt (a predicate: this layer knows no
database, broker or HTTP library), the delays (an iterable: :func:`backoff` forever, a
finite one to give up, :func:`within` to give up before a deadline) and an optional stop
event, which cuts a wait short. What is logged or counted per retry is theirs
(``on_retry``).

Why a module of our own rather than tenacity or stamina: both run coroutines, but a
stop event there is checked between attempts only (tenacity's ``stop_when_event_set``, a
threading event), whereas a stopping consumer must leave in the middle of a five-second
wait; the work done before a retry here is async (dropping a pool of dead connections);
and the CRM webhook's schedule is stored in rows, so it needs the delay formula, not a
loop. The SDK keeps its own small backoff with jitter: it depends on httpx only.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Stopping(Exception):
    """The wait before another attempt was cut short: the process is stopping."""


def exponential(retry: int, first: float, cap: float) -> float:
    """The delay before retry number ``retry`` (0-based): ``first`` doubled each time,
    at most ``cap`` (however large ``retry`` is)."""
    return min(first * 2.0 ** min(retry, 1000), cap)


def backoff(first: float, cap: float) -> Iterator[float]:
    """Exponential delays, forever: ``first``, twice that, ... up to ``cap``."""
    return (exponential(n, first, cap) for n in itertools.count())


def within(delays: Iterable[float], deadline: float, clock: Callable[[], float]) -> Iterator[float]:
    """``delays`` while waiting one more would still end before ``deadline`` (read on
    ``clock`` as each is taken): then none, so the retry gives up."""
    for delay in delays:
        if clock() + delay > deadline:
            return
        yield delay


def cancel_asked() -> bool:
    """Whether a CancelledError caught now was asked of the running task (its ``cancel``,
    a timeout), rather than one a client library let escape from tasks of its own."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop``; whether it was set (the pause of a timer loop)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_if: Callable[[Exception], bool],
    delays: Iterable[float],
    stop: asyncio.Event | None = None,
    on_retry: Callable[[Exception, float], Awaitable[None] | None] | None = None,
    after: Callable[[Exception], float | None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``attempt()`` until it returns. A failure that ``retry_if`` accepts is followed by
    ``on_retry(failure, delay)`` and a wait of the next delay, then another attempt; any
    other failure, or one after the last delay, is raised as it is. A failure that says
    when to come back (``after(failure)``, an HTTP Retry-After) is waited that long
    instead. ``stop`` set before or during a wait raises :class:`Stopping` (from the
    failure). ``sleep`` is for tests."""
    waits = iter(delays)
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not retry_if(exc):
                raise
            delay = next(waits, None)
            if delay is None:
                raise
            if after is not None and (asked := after(exc)) is not None:
                delay = asked
            if on_retry is not None and (pending := on_retry(exc, delay)) is not None:
                await pending
            if stop is None:
                await sleep(delay)
            elif stop.is_set() or await stopped_within(stop, delay):
                raise Stopping(f"stopped while waiting to retry: {exc!r}") from exc
