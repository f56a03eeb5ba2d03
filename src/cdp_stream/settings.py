"""The one typed configuration object, read from ``CDP_*`` environment variables.

It is built once at the edge (the CLI) and passed down; nothing imports a global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdp_stream.origins import origin_pattern
from cdp_stream.topics import Topics

# ``cdp-stream up``'s resolver batch (see ``Settings.resolver_batch_size``): its RSS after
# 100,000 events was 229 MB with it and 375 MB with 8,000 (benchmarks/embedded.py).
ONE_PROCESS_RESOLVER_BATCH = 2000


class Settings(BaseSettings):
    """Every knob cdp-stream has. Unset Kafka/Postgres settings mean the embedded default."""

    model_config = SettingsConfigDict(env_prefix="CDP_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="postgresql+asyncpg://... ; unset: embedded Postgres in data_dir",
    )
    kafka_bootstrap: str | None = Field(
        default=None,
        description="host:port[,host:port]; unset: the Postgres bus, on the database",
    )
    kafka_producer: Literal["aiokafka", "confluent"] = Field(
        default="confluent",
        description="the Kafka producer library: confluent (librdkafka) spends a fraction of "
        "aiokafka's CPU per event (benchmarks/collect.py); aiokafka is the pure-Python one",
    )
    kafka_linger_ms: int = Field(
        default=2,
        ge=0,
        description="how long the producer waits to fill a batch: each client waits for the "
        "acknowledgement, so it is latency on every answer, and a longer one caps "
        "requests/s per connection; 2 ms costs the collector and the broker less CPU per "
        "event than 0 (benchmarks/collect.py, benchmarks/pipeline.py)",
    )
    kafka_session_timeout_ms: int = Field(
        default=30_000, ge=1000, description="how soon the group notices a dead consumer"
    )
    # The Postgres bus (cdp_stream.bus.postgres), used when kafka_bootstrap is unset.
    bus_max_backlog: int = Field(
        default=1_000_000,
        ge=1,
        description="records of a topic some consumer group has not committed yet, past "
        "which publishing fails (the collector answers 503 with Retry-After)",
    )
    bus_retention_s: float = Field(
        default=3600.0,
        ge=0,
        description="how long records stay in the log after every group committed past "
        "them (to rebuild from); a topic no group reads keeps them this long",
    )
    data_dir: Path = Path(".cdp")
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    collector_workers: int = Field(
        default=1,
        ge=1,
        description="collector processes serving one port (`cdp-stream collector`); about "
        "one per core: each is one Python event loop",
    )
    bootstrap_write_key: str | None = None
    bootstrap_api_token: str | None = None
    bootstrap_allowed_origins: list[Annotated[str, AfterValidator(origin_pattern)]] | None = Field(
        default=None,
        description="web origins allowed to send with the bootstrap (else the default) source, "
        'e.g. ["https://shop.example.com", "https://*.example.com"]; unset: left as stored',
    )
    sendgrid_verification_key: str | None = None  # base64 DER public key SendGrid shows
    mailgun_signing_key: str | None = None  # Mailgun's HTTP webhook signing key

    topic_partitions: int = Field(default=6, ge=1)
    topic_namespace: str = Field(
        default="", description="prefix of every topic and group name (shared clusters, tests)"
    )
    # Collector limits (Segment's documented limits).
    max_event_bytes: int = 32 * 1024
    max_request_bytes: int = 500 * 1024
    max_batch_events: int = 2500
    max_json_depth: int = 32
    rate_limit_per_s: float = Field(
        default=2000.0,
        ge=0,
        description="events per second a source may send to one collector process, unless "
        "the source sets its own (see cdp_stream.collector.ratelimit); 0: no limit",
    )
    rate_limit_burst: int = Field(
        default=20_000, ge=1, description="events a source may send at once above its rate"
    )
    # Identity resolution (see cdp_stream.resolver): priority of identifier types (the
    # others follow), how many values of a type one profile may hold, values that never link.
    identity_priority: list[str] = ["user_id", "email", "phone"]
    identity_limits: dict[str, int] = {"user_id": 1}
    identity_default_limit: int = Field(default=5, ge=1)
    identity_blocked_values: list[str] = [
        "",
        "undefined",
        "null",
        "none",
        "nil",
        "nan",
        "anonymous",
        "guest",
        "true",
        "false",
        "[object Object]",
        "0",
        "-1",
    ]
    phone_default_region: str | None = Field(
        default=None, description="ISO country for phone numbers without +country (e.g. DE)"
    )
    # Resolver micro-batching.
    resolver_batch_size: int = Field(
        default=8000,
        ge=1,
        description="events per resolver transaction, at most (a backlog's batches: at a "
        "steady rate the linger ends a batch first). Most of a batch's cost is per profile, "
        "so a bigger batch, holding more events of each person, costs less per event; "
        "`cdp-stream up` takes 2,000 unless this is set: one process holds every stage "
        "and two batches of events decoded, and its memory counts for more",
    )
    resolver_poll_timeout_ms: int = Field(default=200, ge=1)
    activation_poll_timeout_ms: int = Field(
        default=200, ge=1, description="how long an activation poll waits for the first record"
    )
    resolver_linger_ms: int = Field(
        default=50,
        ge=0,
        description="after a poll that did not fill a batch, how long a resolver waits for "
        "more events before applying it: bigger batches, fewer round trips, this much more "
        "event->profile latency (on Kafka the broker holds each fetch this long instead: "
        "fetch.max.wait.ms)",
    )
    resolver_outbox_vacuum_s: float = Field(
        default=1.0, gt=0, description="how often a resolver vacuums the profile-update outbox"
    )
    # Activation (cdp_stream.activation): the CRM feed, audiences, the DMP feed.
    activation_batch_size: int = Field(
        default=4000,
        ge=1,
        description="profile updates per activation transaction, at most (a backlog's "
        "batches: at a steady rate the linger ends a batch first)",
    )
    activation_linger_ms: int = Field(
        default=250,
        ge=0,
        description="the same for activation, which is not on the event->profile path",
    )
    crm_key_pages: list[str] = Field(
        default=["/pricing"], description="path prefixes whose page views are CRM interactions"
    )
    crm_activity_resolution_s: float = Field(
        default=300.0,
        ge=0,
        description="a contact whose only change is its last activity is rewritten (and "
        "sent) once that moved this far: last activity is exact to within this much",
    )
    crm_webhook_url: str | None = None
    crm_webhook_secret: str | None = Field(default=None, description="HMAC-SHA256 key")
    crm_webhook_max_attempts: int = Field(default=8, ge=1)
    crm_webhook_keep_delivered_days: float = Field(
        default=7.0, gt=0, description="how long delivered webhook rows are kept (audit)"
    )
    dmp_k: int = Field(default=100, ge=1, description="buckets under k members are suppressed")
    dmp_epsilon: float | None = Field(
        default=None, gt=0, description="Laplace noise epsilon; unset: exact counts"
    )
    dmp_noise_key: SecretStr | None = Field(
        default=None,
        description="secret of the Laplace noise, shared by every activation process so a "
        "restart does not re-sample it; unset: one drawn per process",
    )
    dmp_dimensions: list[str] = ["country", "device_type", "first_touch_channel"]
    dmp_windows: list[str] = ["hour", "day"]
    dmp_interval_s: float = Field(default=60.0, gt=0, description="how often counts are computed")
    audience_expiry_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="how often time-window audiences drop (or, for 'did not' rules, admit) "
        "the profiles whose events left the window: a member leaves at most this long late",
    )
    suppression_key: SecretStr | None = Field(
        default=None,
        description="seals deleted people's identifiers in the suppression list (see "
        "cdp_stream.profiles.suppression); the same on every process; unset: generated "
        "in data_dir for the embedded default, plain SHA-256 (warned) otherwise",
    )
    suppression_old_keys: list[SecretStr] = Field(
        default=[],
        description="keys being rotated out: still matched, re-sealed by "
        "`cdp-stream suppression-rekey`, then removed",
    )
    # Operating it: logs and metrics (cdp_stream.logs, cdp_stream.metrics).
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], BeforeValidator(lambda v: str(v).lower())
    ] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: JSON lines unless stderr is a terminal"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="port on which a resolver or activation process serves Prometheus "
        "metrics at /metrics; unset: none (the collector and the API serve them on their "
        "HTTP port)",
    )
    startup_timeout_s: float = Field(
        default=60.0, ge=0, description="how long a starting process waits for Kafka/Postgres"
    )
    # How long the collector waits for the broker before answering 503.
    publish_timeout_s: float = Field(default=10.0, gt=0)
    retry_after_s: int = 5

    def in_one_process(self) -> Settings:
        """These settings for ``cdp-stream up``, every stage in one process: resolver
        batches of :data:`ONE_PROCESS_RESOLVER_BATCH` events unless set."""
        if "resolver_batch_size" in self.model_fields_set:
            return self
        return self.model_copy(update={"resolver_batch_size": ONE_PROCESS_RESOLVER_BATCH})

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_namespace)

    @property
    def embedded_postgres(self) -> bool:
        return self.database_url is None

    @property
    def postgres_bus(self) -> bool:
        return self.kafka_bootstrap is None
