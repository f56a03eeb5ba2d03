"""The Kafka bus (aiokafka): the production implementation of :mod:`cdp_stream.bus.base`.

Responsible for: acknowledged publishing (idempotent producer, ``acks=all``), topic
creation, and group consumers with explicit per-partition commits. Every broker failure
and every wait past the publish timeout becomes :class:`BusUnavailable`, so the collector
answers 503 within ``publish_timeout_s`` and never hangs; after a failure the producer is
replaced on the next call, so the bus recovers by itself when the broker comes back.

Not responsible for: serialization, retries above the bus (the caller decides: the
collector answers 503, consumers keep polling), or the broker itself
(``deploy/kafka/kafka.sh``).

Rebalances and commits (:class:`KafkaConsumer`): aiokafka runs the group protocol in a
background task, so a rebalance can start while the caller is still working on the last
batch. The rebalance listener therefore waits, at revoke time, up to ``revoke_grace_s`` for
that batch to be committed (the commit still carries the old generation and succeeds), then
lets the rebalance go on. A commit that comes too late — the group has moved on
(``CommitFailedError``), the partitions are no longer assigned (``IllegalStateError``), or
the broker did not answer within ``commit_timeout_s`` — is logged and dropped, never
raised: those records are delivered again (to the partitions' new owner), and every
consumer downstream is idempotent (messageId). A new assignment restarts every partition
at its committed offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
    for_code,
)

from cdp_stream.bus.base import BusUnavailable, Message, Record, RecordTooLarge, TopicPartition
from cdp_stream.retry import cancel_asked

log = logging.getLogger(__name__)

# What a broker failure looks like from aiokafka: its own errors, socket errors, timeouts.
_FAILURES = (KafkaError, OSError, TimeoutError)

# A lingering consumer's fetch is answered before its linger once this much is there, and
# takes up to PARTITION_FETCH_BYTES of each partition (see KafkaConsumer).
FETCH_MIN_BYTES = 1 << 20
PARTITION_FETCH_BYTES = 4 << 20


def _stop_asked(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancel asked of this task, to let through. aiokafka also lets
    CancelledErrors of its own tasks escape (while a consumer rejoins after the broker
    came back): those are the bus failing, not a stop, and let through, one ended the
    consumer process."""
    return isinstance(exc, asyncio.CancelledError) and cancel_asked()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen (no "exception never retrieved")."""
    if not future.cancelled():
        future.exception()


class KafkaBus:
    """A :class:`~cdp_stream.bus.base.Bus` on a Kafka cluster (see the module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str = "cdp-stream",
        *,
        publish_timeout_s: float = 10.0,
        linger_ms: int = 5,
        max_batch_size: int = 256 * 1024,
        admin_timeout_s: float = 30.0,
        session_timeout_ms: int = 30_000,
    ) -> None:
        self._bootstrap = bootstrap
        self._session_timeout_ms = session_timeout_ms
        self._client_id = client_id
        self._timeout = publish_timeout_s
        self._linger_ms = linger_ms
        self._max_batch_size = max_batch_size
        self._admin_timeout = admin_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._starting: asyncio.Task[AIOKafkaProducer] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._stopped = False

    # -- producer -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the producer; :class:`BusUnavailable` if the broker does not answer."""
        self._stopped = False
        await self._ready(asyncio.get_running_loop().time() + self._timeout)

    async def stop(self) -> None:
        self._stopped = True
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await producer.stop()  # a healthy producer flushes what it holds
            except _FAILURES as exc:
                log.warning("the Kafka producer did not close cleanly: %r", exc)
        if self._closing:
            await asyncio.wait(self._closing, timeout=self._timeout + 1)

    async def _ready(self, deadline: float) -> AIOKafkaProducer:
        """The started producer, starting one if needed. Concurrent callers share a single
        start attempt, each waiting no longer than its own deadline."""
        if self._producer is not None:
            return self._producer
        if self._stopped:
            raise BusUnavailable("the bus is stopped")
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_producer())
            self._starting.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(self._starting)
        except TimeoutError as exc:
            raise BusUnavailable(f"Kafka at {self._bootstrap} did not answer in time") from exc

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_idempotence=True,  # implies acks="all"
            linger_ms=self._linger_ms,
            max_batch_size=self._max_batch_size,
            # Also the lifetime of an unsent batch: it fails rather than waits forever.
            request_timeout_ms=int(self._timeout * 1000),
        )
        try:
            async with asyncio.timeout(self._timeout):
                await producer.start()
        except (*_FAILURES, asyncio.CancelledError) as exc:
            self._discard(producer)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise BusUnavailable(f"Kafka at {self._bootstrap} unreachable: {exc!r}") from exc
        finally:
            self._starting = None
        self._producer = producer
        log.info("Kafka producer connected to %s", self._bootstrap)
        return producer

    def _discard(self, producer: AIOKafkaProducer) -> None:
        """Drop a producer after a failure; the next call starts a fresh one.

        Its unacknowledged records are abandoned, not flushed: the collector has already
        answered 503 for them, and aiokafka's idempotent producer would otherwise retry
        them until the broker is back (it never expires a batch, and ``stop()`` flushes),
        so an event the client was told failed would arrive anyway. A fresh producer
        also means a fresh idempotence sequence. (A record the broker wrote just before
        the failure stays written: the client's retry carries the same messageId.)
        """
        if self._producer is producer:
            self._producer = None

        async def abort() -> None:
            # aiokafka has no public abort: these are the steps of stop() minus the flush,
            # on its private attributes, which is why pyproject.toml pins aiokafka exactly.
            # The sender first: no new produce request starts. Then fail the batches
            # waiting in the accumulator, and only those: a batch whose request is still
            # in flight must stay "pending", because a request that fails puts its batch
            # back and removes it from the pending set (failing it here too was aiokafka's
            # "KeyError: <MessageBatch>", which killed its sender: "'NoneType' object has
            # no attribute 'done'"). Its waiters stop at their own deadline.
            producer._closed = True
            try:
                async with asyncio.timeout(self._timeout):
                    await producer._sender.close()  # in-flight requests end after one try
            except (*_FAILURES, RuntimeError) as exc:
                log.debug("aborting a failed producer: %r", exc)
            failure = BusUnavailable("producer discarded")
            for batches in producer._message_accumulator._batches.values():
                for batch in batches:
                    batch.failure(failure)
                    _retrieve(batch._drain_waiter)  # nobody waits on its drain any more
            await producer.client.close()

        task = asyncio.create_task(abort())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        await self.publish_many([Record(topic, key, value)])

    async def publish_many(self, records: Sequence[Record]) -> None:
        if not records:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        producer = await self._ready(deadline)
        # send() only appends to a batch; batches go out when full or after linger_ms.
        # Enqueue everything first, then wait for all the acks together.
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout_at(deadline):
                for r in records:
                    futures.append(await producer.send(r.topic, r.value, key=r.key))
            _, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
            if pending:
                raise TimeoutError(f"{len(pending)} of {len(records)} records not acknowledged")
            for f in futures:
                if (exc := f.exception()) is not None:
                    raise exc
        except BaseException as exc:
            for f in futures:  # however this call ends, nobody else reads them
                f.add_done_callback(_retrieve)
            if isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError):
                raise RecordTooLarge(f"Kafka refused a record for its size: {exc!r}") from exc
            if not isinstance(exc, _FAILURES):
                raise  # BusUnavailable: its producer was discarded already
            self._discard(producer)
            raise BusUnavailable(f"Kafka did not acknowledge: {exc!r}") from exc

    async def ping(self) -> None:
        deadline = asyncio.get_running_loop().time() + min(self._timeout, 5.0)
        producer = await self._ready(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                await producer.client.fetch_all_metadata()
        except _FAILURES as exc:
            raise BusUnavailable(f"Kafka at {self._bootstrap} unreachable: {exc!r}") from exc

    # -- topics -------------------------------------------------------------------------

    async def ensure_topics(self, topics: Mapping[str, int]) -> None:
        """Create the missing topics (replication: min(3, brokers)) and wait until the
        cluster's metadata shows them. Another process creating one at the same time is
        fine; an existing topic keeps its partition count."""
        if not topics:
            return
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-admin",
            request_timeout_ms=int(self._admin_timeout * 1000),
        )
        try:
            async with asyncio.timeout(self._admin_timeout):
                await admin.start()
                existing = set(await admin.list_topics())
                missing = {t: n for t, n in topics.items() if t not in existing}
                if missing:
                    await self._create(admin, missing)
        except _FAILURES as exc:
            raise BusUnavailable(f"cannot ensure topics on {self._bootstrap}: {exc!r}") from exc
        finally:
            await admin.close()

    async def _create(self, admin: AIOKafkaAdminClient, missing: Mapping[str, int]) -> None:
        brokers = len((await admin.describe_cluster())["brokers"])
        replication = max(1, min(3, brokers))
        response = await admin.create_topics(
            [NewTopic(t, n, replication) for t, n in missing.items()]
        )
        for topic, code, *rest in response.topic_errors:
            error = for_code(code)
            if code != 0 and error is not TopicAlreadyExistsError:
                raise BusUnavailable(f"cannot create topic {topic}: {error.__name__} {rest}")
        log.info("created topics %s (replication %d)", dict(missing), replication)
        while True:  # creation is asynchronous: wait until every partition has a leader
            described = await admin.describe_topics(list(missing))
            if all(
                d["error_code"] == 0
                and len(d["partitions"]) >= missing[d["topic"]]
                and all(p["leader"] >= 0 for p in d["partitions"])
                for d in described
            ):
                return
            await asyncio.sleep(0.1)

    # -- consumers ----------------------------------------------------------------------

    def consumer(self, group: str, topics: Sequence[str], linger_ms: int = 0) -> KafkaConsumer:
        return KafkaConsumer(
            self._bootstrap,
            self._client_id,
            group,
            topics,
            linger_ms=linger_ms,
            session_timeout_ms=self._session_timeout_ms,
        )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KafkaConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTopicPartition]) -> None:
        await self._owner._wait_for_batch(sorted(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTopicPartition]) -> None:
        log.info("group %s: assigned %s", self._owner.group, sorted(assigned))


class KafkaConsumer:
    """A group member on Kafka (see the module docstring for rebalances and commits)."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        group: str,
        topics: Sequence[str],
        *,
        linger_ms: int = 0,
        start_timeout_s: float = 60.0,
        commit_timeout_s: float = 10.0,
        revoke_grace_s: float = 20.0,
        session_timeout_ms: int = 30_000,
        heartbeat_interval_ms: int = 1_000,
    ) -> None:
        self.group = group
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._topics = list(topics)
        # The linger is the broker's: it holds a fetch until FETCH_MIN_BYTES of records are
        # there or linger_ms has passed (fetch.min.bytes, fetch.max.wait.ms). With aiokafka's
        # defaults (1 byte, 500 ms) every producer request answered the fetch waiting on
        # its partitions, and while ``fill`` slept its linger the fetcher went round again
        # and again: hundreds of fetch answers a second at a steady rate, each a round of
        # work for the broker and for this process. Now one a linger; ``fill`` adds none.
        # On a backlog ``fill`` no longer tops a batch up after a linger either, so one
        # round of fetches must carry a batch: 4 MiB a partition, not aiokafka's 1 (with
        # which three resolvers, two partitions each, took ~1,700 events a batch).
        self._fetching: dict[str, int] = {}  # without a linger: aiokafka's defaults
        if linger_ms:
            self._fetching = {
                "fetch_max_wait_ms": linger_ms,
                "fetch_min_bytes": FETCH_MIN_BYTES,
                "max_partition_fetch_bytes": PARTITION_FETCH_BYTES,
            }
        self.linger_ms = 0
        self._start_timeout = start_timeout_s
        self._commit_timeout = commit_timeout_s
        self._revoke_grace = revoke_grace_s
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._consumer: AIOKafkaConsumer | None = None
        # Set while the caller holds a batch it has not committed yet.
        self._in_flight: asyncio.Event | None = None

    async def start(self) -> None:
        """Join the group; returns once this member has its first assignment."""
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
            # The broker waits this long for every member to rejoin: longer than the
            # grace a member gives its in-flight batch at revoke time.
            rebalance_timeout_ms=int((self._revoke_grace + 30) * 1000),
            metadata_max_age_ms=30_000,
            **self._fetching,
        )
        consumer.subscribe(self._topics, listener=_Listener(self))
        try:
            async with asyncio.timeout(self._start_timeout):
                await consumer.start()
        except (*_FAILURES, asyncio.CancelledError) as exc:
            if _stop_asked(exc):
                raise
            await self._close(consumer)
            raise BusUnavailable(f"cannot join group {self.group}: {exc!r}") from exc
        self._consumer = consumer

    async def stop(self) -> None:
        """Leave the group now (LeaveGroup): uncommitted records go to the next owner."""
        self._batch_done()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await self._close(consumer)

    async def _close(self, consumer: AIOKafkaConsumer) -> None:
        """Close it, whatever state the broker left it in: closing a client whose
        connection the broker dropped can raise uvloop's RuntimeError ("the handler is
        closed") from aiokafka's metadata task (test_faults: a resolver ended there)."""
        try:
            async with asyncio.timeout(self._commit_timeout):
                await consumer.stop()
        except (*_FAILURES, RuntimeError, asyncio.CancelledError) as exc:
            if _stop_asked(exc):
                raise
            log.warning("group %s: consumer did not close cleanly: %r", self.group, exc)

    def assignment(self) -> frozenset[TopicPartition]:
        if self._consumer is None:
            return frozenset()
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    async def getmany(self, max_records: int, timeout_ms: int) -> list[Message]:
        consumer = self._require()
        self._batch_done()  # asking for more: the previous batch is finished either way
        try:
            data = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except (KafkaError, asyncio.CancelledError) as exc:
            if _stop_asked(exc):
                raise
            raise BusUnavailable(f"group {self.group}: fetch failed: {exc!r}") from exc
        messages = [
            Message(r.topic, r.partition, r.offset, r.key, r.value or b"")
            for records in data.values()
            for r in records
        ]
        if messages:
            self._in_flight = asyncio.Event()
        return messages

    async def lag(self) -> dict[TopicPartition, int]:
        consumer = self._require()
        owned = sorted(consumer.assignment())
        if not owned:
            return {}
        try:
            async with asyncio.timeout(self._commit_timeout):
                ends = await consumer.end_offsets(owned)
                committed = {tp: await consumer.committed(tp) for tp in owned}
        except _FAILURES as exc:
            raise BusUnavailable(f"group {self.group}: offsets not answered: {exc!r}") from exc
        return {
            (tp.topic, tp.partition): ends[tp] - (committed[tp] or 0) for tp in owned if tp in ends
        }

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        consumer = self._require()
        try:
            owned = consumer.assignment()
            mine = {}
            for (topic, partition), offset in offsets.items():
                tp = KafkaTopicPartition(topic, partition)
                if tp in owned:
                    mine[tp] = offset
            if len(mine) < len(offsets):
                self._refused(sorted(set(offsets) - {(t.topic, t.partition) for t in mine}))
            if not mine:
                return
            try:
                async with asyncio.timeout(self._commit_timeout):
                    await consumer.commit(mine)
            except (CommitFailedError, IllegalStateError) as exc:
                self._refused(sorted(mine), exc)
            except TimeoutError:
                log.warning(
                    "group %s: commit not answered within %.0fs; the records may be "
                    "delivered again",
                    self.group,
                    self._commit_timeout,
                )
            except (KafkaError, asyncio.CancelledError) as exc:
                if _stop_asked(exc):
                    raise
                raise BusUnavailable(f"group {self.group}: commit failed: {exc!r}") from exc
        finally:
            self._batch_done()

    def _refused(self, partitions: Sequence[Any], exc: Exception | None = None) -> None:
        log.warning(
            "group %s: commit refused for %s (partitions moved to another member%s); "
            "their records will be delivered again",
            self.group,
            partitions,
            f": {exc}" if exc else "",
        )

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("consumer is not started")
        return self._consumer

    def _batch_done(self) -> None:
        if self._in_flight is not None:
            self._in_flight.set()
            self._in_flight = None

    async def _wait_for_batch(self, revoked: Sequence[KafkaTopicPartition]) -> None:
        """At revoke time: give the caller's in-flight batch a chance to commit first."""
        in_flight = self._in_flight
        log.info("group %s: revoking %s", self.group, list(revoked))
        if in_flight is None:
            return
        try:
            async with asyncio.timeout(self._revoke_grace):
                await in_flight.wait()
        except TimeoutError:
            log.warning(
                "group %s: batch still in flight after %.0fs at rebalance; its commit will "
                "be refused and its records delivered again",
                self.group,
                self._revoke_grace,
            )
