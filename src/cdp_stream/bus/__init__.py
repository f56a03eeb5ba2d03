"""The bus: the seam between stages, and the one place that picks an implementation.

``make_bus`` returns the Kafka bus when ``CDP_KAFKA_BOOTSTRAP`` is set (producing with
librdkafka, or with aiokafka when ``CDP_KAFKA_PRODUCER=aiokafka``) and the in-process memory
bus otherwise; both keep the contract written in :mod:`cdp_stream.bus.base`. Code above
this package only sees :class:`Bus`, :class:`Consumer` and friends; it never imports
``kafka`` or ``memory`` directly (tests and benchmarks aside).
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
from cdp_stream.settings import Settings

__all__ = [
    "Bus",
    "BusUnavailable",
    "Consumer",
    "KafkaBus",
    "MemoryBus",
    "Message",
    "Record",
    "TopicPartition",
    "make_bus",
    "next_offsets",
]


def make_bus(settings: Settings, client_id: str) -> Bus:
    """Kafka when ``settings.kafka_bootstrap`` is set, else the in-process bus."""
    if not settings.kafka_bootstrap:
        return MemoryBus(default_partitions=settings.topic_partitions)
    kind = ConfluentKafkaBus if settings.kafka_producer == "confluent" else KafkaBus
    return kind(
        settings.kafka_bootstrap,
        client_id,
        publish_timeout_s=settings.publish_timeout_s,
        linger_ms=settings.kafka_linger_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
    )
