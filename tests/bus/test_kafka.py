"""The Kafka bus when its broker dies under publish load (a broker of the test's own,
killed with SIGKILL): every failed publish is a :class:`BusUnavailable`, publishing works
again once the broker is back, and nothing is left behind in the event loop — no "Task
exception was never retrieved", no error raised in an aiokafka callback. And a record
too large for Kafka is :class:`RecordTooLarge`, not an outage; a consumer's linger is
the broker's."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from typing import Any

import aiokafka
import pytest

from cdp_stream.bus.base import BusUnavailable, Record, RecordTooLarge, rejoin
from cdp_stream.bus.confluent import ConfluentKafkaBus
from cdp_stream.bus.kafka import KafkaBus
from tests.support import eventually, kafka_pid, kafka_sh, uid

PORT = int(os.environ.get("CDP_TEST_OUTAGE_KAFKA_PORT", "19092"))


async def test_a_broker_killed_under_load_leaves_nothing_unretrieved(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    await kafka_sh("start", PORT)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    bus = KafkaBus(f"127.0.0.1:{PORT}", publish_timeout_s=2)
    topic, done = f"test-kill-{uid()}", asyncio.Event()
    outcomes = {"acked": 0, "unavailable": 0}

    async def load(n: int) -> None:
        while not done.is_set():
            records = [Record(topic, f"{n}-{i}".encode(), b"x" * 200) for i in range(50)]
            try:
                await bus.publish_many(records)
                outcomes["acked"] += 1
            except BusUnavailable:
                outcomes["unavailable"] += 1
                await asyncio.sleep(0.05)

    try:
        await bus.start()
        await bus.ensure_topics({topic: 3})
        publishers = [asyncio.create_task(load(n)) for n in range(20)]
        await asyncio.sleep(2)
        os.kill(kafka_pid(PORT), signal.SIGKILL)
        await asyncio.sleep(4)
        await kafka_sh("start", PORT)
        before = outcomes["acked"]

        async def publishing_again() -> bool:
            return outcomes["acked"] > before + 20

        assert await eventually(publishing_again, within_s=60)
        done.set()
        await asyncio.gather(*publishers)
        await bus.stop()
        await asyncio.sleep(0.5)  # what the aborted producers' tasks still had to say
        gc.collect()  # "never retrieved" is reported when a task or future is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        await kafka_sh("stop", PORT)
    assert outcomes["unavailable"] > 0
    assert [str(c.get("exception") or c["message"]) for c in reported] == []
    raised = [r for r in caplog.records if r.name.startswith("aiokafka") and r.exc_info]
    assert raised == []


@pytest.mark.parametrize("library", ["aiokafka", "confluent"])
async def test_a_record_too_large_is_refused_as_such_and_the_bus_goes_on(
    kafka_bootstrap: str, library: str
) -> None:
    """Not an outage: the caller can set that one record aside (cdp_stream.poison)."""
    bus = KafkaBus(kafka_bootstrap) if library == "aiokafka" else ConfluentKafkaBus(kafka_bootstrap)
    topic = f"test-large-{uid()}"
    await bus.start()
    try:
        await bus.ensure_topics({topic: 1})
        with pytest.raises(RecordTooLarge):
            await bus.publish_many([Record(topic, b"k", b"x" * 2_000_000)])
        await bus.publish_many([Record(topic, b"k", b"fits")])
    finally:
        await bus.stop()


async def test_a_cancellation_the_kafka_client_lets_escape_is_the_bus_failing(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka can raise a CancelledError of its own from ``start`` (a consumer rejoining
    after the broker came back did): that is :class:`BusUnavailable`, which ``rejoin``
    tries again, not a stop, which ended the consumer process. A cancel asked of the
    task still cancels it."""
    bus = KafkaBus(kafka_bootstrap)
    topic = f"test-cancel-{uid()}"
    await bus.start()
    await bus.ensure_topics({topic: 1})
    consumer = bus.consumer(f"test-cancel-{uid()}", [topic])
    start, failures = aiokafka.AIOKafkaConsumer.start, [1, 1]

    async def cancelled_once(self: aiokafka.AIOKafkaConsumer) -> None:
        if failures:
            failures.pop()
            raise asyncio.CancelledError
        await start(self)

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "start", cancelled_once)
    try:
        with pytest.raises(BusUnavailable, match="CancelledError"):
            await consumer.start()
        await rejoin(consumer, asyncio.Event())  # its first try meets the second one
        assert consumer.assignment() == {(topic, 0)}

        polling = asyncio.create_task(consumer.getmany(10, 30_000))
        await asyncio.sleep(0.5)
        polling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await polling
    finally:
        await consumer.stop()
        await bus.stop()


async def test_a_consumer_the_broker_left_broken_still_closes(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving the group after the broker dropped the connection: aiokafka's close raised
    uvloop's RuntimeError from its metadata task, which ended a resolver (test_faults).
    The consumer is closed anyway, and joins again."""
    bus = KafkaBus(kafka_bootstrap)
    topic = f"test-close-{uid()}"
    await bus.start()
    await bus.ensure_topics({topic: 1})
    consumer = bus.consumer(f"test-close-{uid()}", [topic])
    stop, broken = aiokafka.AIOKafkaConsumer.stop, [1]

    async def closed_handler(self: aiokafka.AIOKafkaConsumer) -> None:
        await stop(self)
        if broken:
            broken.pop()
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "stop", closed_handler)
    try:
        await consumer.start()
        await rejoin(consumer, asyncio.Event())
        assert consumer.assignment() == {(topic, 0)}
        assert any("did not close cleanly" in r.getMessage() for r in caplog.records)
    finally:
        await consumer.stop()
        await bus.stop()


@pytest.mark.parametrize("linger_ms", [0, 1_000])
async def test_a_lingering_consumer_is_answered_by_the_broker_once_a_linger(
    kafka_bootstrap: str, linger_ms: int
) -> None:
    """The Kafka consumer's linger is the broker's (``fetch.max.wait.ms``), not a sleep in
    ``fill``: polled by ``getmany`` alone, records published 50 ms apart come in a few
    answers with a linger, one or two at a time without."""
    bus = KafkaBus(kafka_bootstrap)
    topic = f"test-linger-{uid()}"
    await bus.start()
    await bus.ensure_topics({topic: 1})
    consumer = bus.consumer(f"test-linger-{uid()}", [topic], linger_ms)
    await consumer.start()
    try:
        assert consumer.linger_ms == 0  # fill adds no wait of its own

        async def trickle() -> None:
            for i in range(10):
                await bus.publish(topic, b"k", f"t{i}".encode())
                await asyncio.sleep(0.05)

        sending = asyncio.create_task(trickle())
        answers: list[int] = []
        while sum(answers) < 10:
            if got := await consumer.getmany(100, 5_000):
                answers.append(len(got))
        await sending
        assert (len(answers) <= 4) == (linger_ms > 0), answers
    finally:
        await consumer.stop()
        await bus.stop()
