"""Every Prometheus metric cdp-stream exports, defined here and only here.

One module so that the names are spelled once: the stages import the objects they move,
``/metrics`` (the collector's and the API's) and the consumers' metrics port serve
:func:`exposition`, and the Grafana dashboard's test checks its queries against
:func:`metric_names`. Names follow Prometheus's conventions: a ``cdp_`` prefix, counters
end in ``_total``, durations are histograms in seconds. Every label has a bounded set of
values (a stage, a route template, a status code, a source id, a consumer group and
partition, a reason category); never a person's id or an event's.

Several collector processes serving one port (``CDP_COLLECTOR_WORKERS``) share their
numbers through prometheus_client's multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR``
set (``cdp-stream collector`` sets one up for its workers), each process writes its
values to files there and a scrape of any worker adds them up.

Not here: what a process measures and when (the stages do, at the point where it
happens), and counting from tables (a scrape never runs a query).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "REGISTRY", "exposition", "metric_names", "serve"]

# The ``*_created`` series double every counter's and histogram's series for a timestamp
# no dashboard here reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets from a fraction of a millisecond (one request, one produce) to tens of
# seconds (a batch waiting out a database outage).
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)

# --- HTTP: the collector and the API ---------------------------------------------------
http_requests = Counter(
    "cdp_http_requests",
    "HTTP requests answered, by route template, method and status code",
    ["route", "method", "status"],
    registry=REGISTRY,
)
http_request_duration = Histogram(
    "cdp_http_request_duration_seconds",
    "time to answer a request (its body sent), by route template",
    ["route"],
    buckets=_LATENCY,
    registry=REGISTRY,
)

# --- Events: accepted at the collector, rejected by any stage --------------------------
events_accepted = Counter(
    "cdp_events_accepted",
    "events the collector published to cdp.events, by source",
    ["source"],
    registry=REGISTRY,
)
events_rejected = Counter(
    "cdp_events_rejected",
    "events refused, by the stage that refused them, source and reason category "
    "(collector: invalid, too_large, rate_limited; resolver: not_an_event, unidentified, "
    "suppressed)",
    ["stage", "source", "reason"],
    registry=REGISTRY,
)
produce_duration = Histogram(
    "cdp_produce_duration_seconds",
    "time for the broker to acknowledge one publish call, by the stage publishing",
    ["stage"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
produce_failures = Counter(
    "cdp_produce_failures",
    "publish calls the broker did not acknowledge (bus unavailable), by stage",
    ["stage"],
    registry=REGISTRY,
)

# --- The consumer runtime (resolver and activation) ------------------------------------
consumer_lag = Gauge(
    "cdp_consumer_lag",
    "records behind: log end offset minus the group's committed offset, per partition "
    "this process owns (group: the stage's name)",
    ["group", "topic", "partition"],
    multiprocess_mode="max",
    registry=REGISTRY,
)
consumer_records = Counter(
    "cdp_consumer_records",
    "records a consumer group applied and committed",
    ["group"],
    registry=REGISTRY,
)
consumer_batch_records = Histogram(
    "cdp_consumer_batch_records",
    "records per polled batch",
    ["group"],
    buckets=_BATCH,
    registry=REGISTRY,
)
consumer_step_duration = Histogram(
    "cdp_consumer_step_duration_seconds",
    "time per batch in each step of the consumer loop (poll, decode, apply, commit)",
    ["group", "step"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
consumer_rejoins = Counter(
    "cdp_consumer_rejoins",
    "times a consumer left and rejoined its group after the bus failed mid-batch",
    ["group"],
    registry=REGISTRY,
)
dead_letters = Counter(
    "cdp_dead_letters",
    "records a consumer could never apply, parked on cdp.dead-letters",
    ["consumer"],
    registry=REGISTRY,
)

# --- Postgres: lock waits and retried transactions -------------------------------------
lock_wait = Histogram(
    "cdp_lock_wait_seconds",
    "time a resolver batch waited for its locks (identifier advisory locks, profile rows)",
    ["lock"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
retries = Counter(
    "cdp_transaction_retries",
    "transactions run again, by cause (conflict: serialization failure, deadlock or a "
    "racing insert; stale_read: identities moved while locking; outage: database away)",
    ["cause"],
    registry=REGISTRY,
)

# --- Identity resolution ---------------------------------------------------------------
resolver_events = Counter(
    "cdp_resolver_events",
    "events the resolver took, by outcome (stored, duplicate; held_back: their people were"
    " locked by another resolver, so they went into a later batch)",
    ["outcome"],
    registry=REGISTRY,
)
profile_merges = Counter(
    "cdp_profile_merges", "profiles merged into another one", registry=REGISTRY
)
identity_refusals = Counter(
    "cdp_identity_refusals", "links refused by an identity limit", registry=REGISTRY
)
profile_unmerges = Counter("cdp_profile_unmerges", "merges undone by an unmerge", registry=REGISTRY)
outbox_rows = Gauge(
    "cdp_profile_updates_outbox_rows",
    "profile updates written but not yet relayed to cdp.profile-updates (last count)",
    multiprocess_mode="max",
    registry=REGISTRY,
)
profile_updates_relayed = Counter(
    "cdp_profile_updates_relayed",
    "profile updates relayed from the outbox to cdp.profile-updates",
    registry=REGISTRY,
)

# --- Activation ------------------------------------------------------------------------
audience_transitions = Counter(
    "cdp_audience_transitions",
    "audience membership changes (enter, exit)",
    ["direction"],
    registry=REGISTRY,
)
webhook_deliveries = Counter(
    "cdp_webhook_deliveries",
    "CRM webhook delivery attempts, by outcome (delivered, retry, dead)",
    ["outcome"],
    registry=REGISTRY,
)
dmp_buckets = Counter(
    "cdp_dmp_buckets",
    "DMP audience count buckets computed, by outcome (published, suppressed under k)",
    ["outcome"],
    registry=REGISTRY,
)


def _scraped() -> CollectorRegistry:
    """This process's metrics, or, in multiprocess mode, every process's that writes to
    ``PROMETHEUS_MULTIPROC_DIR``."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition() -> bytes:
    """The text a scrape of ``/metrics`` gets."""
    return generate_latest(_scraped())


def serve(host: str, port: int) -> Callable[[], None]:
    """Serve ``/metrics`` on ``host:port`` from a thread (a consumer process has no HTTP
    server of its own); returns what stops it."""
    server, thread = start_http_server(port, host, registry=_scraped())

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


_SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def metric_names() -> frozenset[str]:
    """Every series name a scrape can show (``cdp_x_total``, ``cdp_y_seconds_bucket``,
    ...), whether or not it has a value yet: what a dashboard query may name."""
    return frozenset(
        metric.name + suffix for metric in REGISTRY.collect() for suffix in _SERIES[metric.type]
    )
