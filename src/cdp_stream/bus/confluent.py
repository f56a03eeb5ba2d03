"""The Kafka bus with librdkafka (confluent-kafka) as producer: the default
(``CDP_KAFKA_PRODUCER=confluent``).

Why it exists: publishing is most of the collector's CPU with aiokafka, whose producer
builds record batches in Python (``benchmarks/collect.py`` measures both). librdkafka
batches, compresses and sends in its own C threads, so the event loop only enqueues.

Same contract as :class:`~cdp_stream.bus.kafka.KafkaBus`, whose topic creation and
consumers it inherits: idempotent, ``acks=all``; keys hashed with Kafka's murmur2, so a
key lands on the partition the Java client, aiokafka and the memory bus choose; every
failure or wait past ``publish_timeout_s`` becomes :class:`BusUnavailable`. After a
failure the producer is purged (its queued records are abandoned, never sent late to a
client already told 503) and replaced by a fresh one on the next call.

How acknowledgements reach the event loop: a daemon thread serves librdkafka's delivery
reports (``poll``); each ``publish_many`` counts its records down there. The calls whose
last record was acknowledged (or whose first failed) during one ``poll`` are woken
together, with one ``call_soon_threadsafe``: a wake-up costs the loop a self-pipe write
and read, and at thousands of single-event requests per second one per request was a
measurable share of the collector's CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from cdp_stream.bus.base import BusUnavailable, Record, RecordTooLarge
from cdp_stream.bus.kafka import KafkaBus

log = logging.getLogger(__name__)


def _too_large(error: Any) -> bool:
    """A record over the producer's or the broker's size limit: not an outage."""
    return bool(error.code() == KafkaError.MSG_SIZE_TOO_LARGE)


class _Acks:
    """Delivery reports of one ``publish_many``, counted down in the poll thread; once
    complete (or failed) it joins ``finished``, woken after the current ``poll``."""

    __slots__ = ("error", "finished", "future", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, finished: list[_Acks]) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.remaining = count
        self.error: KafkaError | None = None
        self.finished = finished

    def delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            if self.error is None:
                self.error = err
                self.finished.append(self)
            return
        self.remaining -= 1
        if self.remaining == 0 and self.error is None:
            self.finished.append(self)


def _wake(finished: list[_Acks]) -> None:
    for acks in finished:
        if not acks.future.done():
            acks.future.set_result(None)


class _Producer:
    """A librdkafka producer and the thread that serves its delivery reports."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.producer = Producer(config)
        self.finished: list[_Acks] = []  # appended to by delivery reports, in the thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cdp-rdkafka", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)
            self._wake_finished()

    def _wake_finished(self) -> None:
        """One wake-up per event loop for every call finished since the last one."""
        loops: dict[asyncio.AbstractEventLoop, list[_Acks]] = {}
        while self.finished:
            acks = self.finished.pop()
            loops.setdefault(acks.loop, []).append(acks)
        for loop, woken in loops.items():
            loop.call_soon_threadsafe(_wake, woken)

    def close(self, flush_s: float) -> int:
        """Stop serving; flush up to ``flush_s`` (0: purge instead). Returns records left."""
        if flush_s <= 0:
            self.producer.purge(in_queue=True, in_flight=True)
        left = int(self.producer.flush(max(flush_s, 0.5)))
        self._stop.set()
        self._thread.join()
        self._wake_finished()  # what the flush acknowledged after the thread's last poll
        return left


class ConfluentKafkaBus(KafkaBus):
    """:class:`KafkaBus` publishing through librdkafka (see the module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str = "cdp-stream",
        *,
        publish_timeout_s: float = 10.0,
        linger_ms: int = 5,
        admin_timeout_s: float = 30.0,
        session_timeout_ms: int = 30_000,
    ) -> None:
        super().__init__(
            bootstrap,
            client_id,
            publish_timeout_s=publish_timeout_s,
            linger_ms=linger_ms,
            admin_timeout_s=admin_timeout_s,
            session_timeout_ms=session_timeout_ms,
        )
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,  # implies acks=all
            "linger.ms": linger_ms,
            "partitioner": "murmur2_random",  # the Java client's choice for keyed records
            # A record not acknowledged by then fails instead of waiting for the broker.
            "message.timeout.ms": int(publish_timeout_s * 1000),
            "socket.connection.setup.timeout.ms": int(publish_timeout_s * 1000),
        }
        self._rd: _Producer | None = None

    async def start(self) -> None:
        """Create the producer and check that the broker answers."""
        self._stopped = False
        await self.ping()

    async def stop(self) -> None:
        self._stopped = True
        rd, self._rd = self._rd, None
        if rd is not None:
            left = await asyncio.to_thread(rd.close, self._timeout)
            if left:
                log.warning("the Kafka producer closed with %d records unacknowledged", left)

    def _producer_now(self) -> _Producer:
        if self._stopped:
            raise BusUnavailable("the bus is stopped")
        if self._rd is None:
            self._rd = _Producer(self._config)
        return self._rd

    def _fail(self, rd: _Producer) -> None:
        """Abandon a failed producer's records (see the module docstring)."""
        if self._rd is rd:
            self._rd = None
        threading.Thread(target=rd.close, args=(0,), daemon=True).start()

    async def publish_many(self, records: Sequence[Record]) -> None:
        if not records:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        rd = self._producer_now()
        acks = _Acks(loop, len(records), rd.finished)  # the list stays, only emptied
        try:
            for r in records:
                while True:
                    try:
                        rd.producer.produce(r.topic, r.value, r.key, on_delivery=acks.delivered)
                        break
                    except BufferError:  # librdkafka's queue is full: let it drain
                        if loop.time() > deadline:
                            raise TimeoutError("the producer queue stayed full") from None
                        await asyncio.sleep(0.005)
            async with asyncio.timeout_at(deadline):
                await acks.future
        except (TimeoutError, KafkaException) as exc:
            if isinstance(exc, KafkaException) and _too_large(exc.args[0]):
                raise RecordTooLarge(f"Kafka refused a record for its size: {exc!r}") from exc
            self._fail(rd)
            raise BusUnavailable(f"Kafka did not acknowledge: {exc!r}") from exc
        if acks.error is not None:
            if _too_large(acks.error):
                raise RecordTooLarge(f"Kafka refused a record for its size: {acks.error.str()}")
            self._fail(rd)
            raise BusUnavailable(f"Kafka did not acknowledge: {acks.error.str()}")

    async def ping(self) -> None:
        rd = self._producer_now()
        wait = min(self._timeout, 5.0)
        try:
            await asyncio.to_thread(rd.producer.list_topics, timeout=wait)
        except KafkaException as exc:
            raise BusUnavailable(f"Kafka at {self._bootstrap} unreachable: {exc!r}") from exc
