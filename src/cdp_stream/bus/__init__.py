"""The bus: the seam between stages, and the one place that picks an implementation.

``make_bus`` returns the Kafka bus when ``CDP_KAFKA_BOOTSTRAP`` is set (producing with
librdkafka, or with aiokafka when ``CDP_KAFKA_PRODUCER=aiokafka``) and the Postgres bus on
the process's database otherwise (the embedded default); every bus keeps the contract
written in :mod:`cdp_stream.bus.base` (the in-process memory bus too, which serves tests).
Code above this package only sees :class:`Bus`, :class:`Consumer` and friends; it never
imports ``kafka``, ``postgres`` or ``memory`` directly (tests and benchmarks aside).
"""

from __future__ import annotations

from cdp_stream.bus.base import (
    Bus,
    BusUnavailable,
    Consumer,
    Message,
    Record,
    TopicPartition,
    next_offsets,
)
from cdp_stream.bus.confluent import ConfluentKafkaBus
from cdp_stream.bus.kafka import KafkaBus
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.bus.postgres import PostgresBus, postgres_dsn
from cdp_stream.settings import Settings

__all__ = [
    "Bus",
    "BusUnavailable",
    "Consumer",
    "KafkaBus",
    "MemoryBus",
    "Message",
    "PostgresBus",
    "Record",
    "TopicPartition",
    "make_bus",
    "next_offsets",
]


def make_bus(settings: Settings, client_id: str, database_url: str) -> Bus:
    """Kafka when ``settings.kafka_bootstrap`` is set, else the Postgres bus on
    ``database_url`` (the SQLAlchemy URL of the process's database)."""
    if not settings.kafka_bootstrap:
        return PostgresBus(
            postgres_dsn(database_url),
            client_id,
            default_partitions=settings.topic_partitions,
            publish_timeout_s=settings.publish_timeout_s,
            max_backlog=settings.bus_max_backlog,
            retention_s=settings.bus_retention_s,
        )
    kind = ConfluentKafkaBus if settings.kafka_producer == "confluent" else KafkaBus
    return kind(
        settings.kafka_bootstrap,
        client_id,
        publish_timeout_s=settings.publish_timeout_s,
        linger_ms=settings.kafka_linger_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
    )
