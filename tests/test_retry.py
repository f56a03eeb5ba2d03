"""The retry helper, pure: the sleep and the clock are injected, nothing waits for real."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cdp_stream.retry import Stopping, backoff, exponential, retry, within


class Flaky:
    """Fails with each of ``failures`` in turn, then returns ``"ok"``."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


class Sleeps:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_backoff_doubles_up_to_its_cap_and_never_overflows() -> None:
    assert list(itertools.islice(backoff(0.05, 5.0), 9)) == [
        0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0
    ]  # fmt: skip
    assert exponential(0, 5.0, 3600.0) == 5.0
    assert exponential(10**6, 5.0, 3600.0) == 3600.0


def test_within_gives_up_before_a_wait_would_pass_the_deadline() -> None:
    now = [0.0]
    delays = within(iter([0.5, 1.0, 2.0, 4.0]), deadline=3.0, clock=lambda: now[0])
    assert next(delays) == 0.5
    now[0] = 1.5
    assert next(delays) == 1.0
    now[0] = 1.5  # 1.5 + 2.0 > 3.0
    assert next(delays, None) is None


async def test_retries_what_the_predicate_accepts_with_the_given_delays() -> None:
    flaky, sleeps, seen = Flaky(OSError("a"), OSError("b")), Sleeps(), []
    result = await retry(
        flaky,
        retry_if=lambda exc: isinstance(exc, OSError),
        delays=backoff(1.0, 10.0),
        on_retry=lambda exc, delay: seen.append((str(exc), delay)),
        sleep=sleeps,
    )
    assert result == "ok" and flaky.calls == 3
    assert sleeps.slept == [1.0, 2.0] and seen == [("a", 1.0), ("b", 2.0)]


async def test_another_failure_is_raised_at_once() -> None:
    flaky, sleeps = Flaky(OSError("a"), ValueError("bad")), Sleeps()
    with pytest.raises(ValueError, match="bad"):
        await retry(
            flaky, retry_if=lambda e: isinstance(e, OSError), delays=backoff(1, 5), sleep=sleeps
        )
    assert flaky.calls == 2 and sleeps.slept == [1]


async def test_gives_up_with_the_last_failure_after_the_last_delay() -> None:
    flaky, sleeps = Flaky(*(OSError(str(n)) for n in range(5))), Sleeps()
    with pytest.raises(OSError, match="2"):
        await retry(flaky, retry_if=lambda _: True, delays=(0.0, 0.0), sleep=sleeps)
    assert flaky.calls == 3 and sleeps.slept == [0.0, 0.0]


async def test_an_async_on_retry_is_awaited_before_the_wait() -> None:
    order: list[str] = []

    async def on_retry(_exc: Exception, _delay: float) -> None:
        order.append("on_retry")

    async def sleep(_seconds: float) -> None:
        order.append("sleep")

    await retry(
        Flaky(OSError()), retry_if=lambda _: True, delays=[1.0], on_retry=on_retry, sleep=sleep
    )
    assert order == ["on_retry", "sleep"]


async def test_a_stop_set_before_the_wait_raises_stopping_from_the_failure() -> None:
    stop, flaky = asyncio.Event(), Flaky(OSError("down"), OSError("down"))
    with pytest.raises(Stopping) as stopped:
        await retry(
            flaky,
            retry_if=lambda _: True,
            delays=itertools.repeat(3600.0),
            stop=stop,
            on_retry=lambda _exc, _delay: stop.set(),
        )
    assert flaky.calls == 1 and isinstance(stopped.value.__cause__, OSError)


async def test_a_stop_set_during_a_long_wait_ends_it() -> None:
    stop, flaky = asyncio.Event(), Flaky(*(OSError() for _ in range(10)))
    asyncio.get_running_loop().call_soon(stop.set)
    with pytest.raises(Stopping):  # an hour's wait, ended as soon as stop is set
        await asyncio.wait_for(
            retry(flaky, retry_if=lambda _: True, delays=itertools.repeat(3600.0), stop=stop),
            timeout=60,
        )
    assert flaky.calls == 1


async def test_cancellation_is_never_retried() -> None:
    flaky, sleeps = Flaky(asyncio.CancelledError()), Sleeps()
    with pytest.raises(asyncio.CancelledError):
        await retry(flaky, retry_if=lambda _: True, delays=itertools.repeat(0.0), sleep=sleeps)
    assert sleeps.slept == []


class Busy(Exception):
    def __init__(self, after: float | None) -> None:
        self.after = after


async def test_a_failure_that_says_when_to_come_back_is_waited_that_long() -> None:
    flaky, sleeps = Flaky(Busy(7.0), Busy(None), Busy(0.5)), Sleeps()
    await retry(
        flaky,
        retry_if=lambda e: isinstance(e, Busy),
        delays=itertools.repeat(1.0),
        after=lambda e: e.after if isinstance(e, Busy) else None,
        sleep=sleeps,
    )
    assert sleeps.slept == [7.0, 1.0, 0.5]
