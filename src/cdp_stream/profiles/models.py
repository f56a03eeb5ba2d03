"""The tables, as SQLAlchemy Core metadata.

The schema itself is created only by the Alembic migrations in ``migrations/``; a test
compares them with this metadata so the two never drift.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = MetaData()

_now = func.now()
_empty_object = text("'{}'::jsonb")

# Sources are where events come from; the write key is public (it ships in web pages),
# so it is stored as is and grants nothing but writing events. allowed_origins lists the
# web origins whose pages may use it (the collector refuses others and answers CORS for these).
sources = Table(
    "sources",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("write_key", Text, nullable=False, unique=True),
    Column("allowed_origins", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    # The source's rate limit (see collector/ratelimit.py); NULL: the Settings default.
    Column("rate_limit_per_s", Float),
    Column("rate_limit_burst", Integer),
)

# API tokens are secrets: only their SHA-256 is stored.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("token_hash", Text, nullable=False, unique=True),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

# A profile is canonical while merged_into is null; a merged-away profile keeps its row
# so that lookups by its id land on the canonical one.
profiles = Table(
    "profiles",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("merged_into", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=True),
    Column("traits", JSONB, nullable=False, server_default=_empty_object),
    # {"set": {name: [ts, value]}, "once": {...}}: see cdp_stream.resolver.traits
    Column("trait_state", JSONB, nullable=False, server_default=_empty_object),
    Column("computed", JSONB, nullable=False, server_default=_empty_object),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=_now),
    # Lookups gather a canonical profile's merged-away ids (WHERE merged_into = $1): without
    # it each lookup scans the table. Partial, since most profiles were never merged.
    Index(
        "profiles_merged_into_idx", "merged_into", postgresql_where=text("merged_into IS NOT NULL")
    ),
)

# One identifier belongs to exactly one profile: the primary key is the serialization
# point for concurrent resolvers.
identities = Table(
    "identities",
    metadata,
    Column("type", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("profile_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    # The profile that first claimed it: what an unmerge regroups by.
    Column("claimed_by", UUID(as_uuid=True), nullable=False),
    PrimaryKeyConstraint("type", "value", name="identities_pkey"),
    # Covering what is read by profile (its identities, a contact's), so that those reads
    # are index-only scans (migration 0013).
    Index(
        "identities_profile_type_idx",
        "profile_id",
        "type",
        postgresql_include=["value", "created_at"],
    ),
)

profile_merges = Table(
    "profile_merges",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("canonical_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=False),
    Column("merged_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=False),
    Column("source_id", Text, nullable=True),
    Column("message_id", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("undone_at", DateTime(timezone=True), nullable=True),  # set by an unmerge
    Index("profile_merges_canonical_idx", "canonical_id"),
    Index("profile_merges_merged_idx", "merged_id"),
)

# Pairs of profiles an operator split (an unmerge) and the resolver must not merge again,
# stored both ways round (profile_id, other_id) and (other_id, profile_id): a batch finds
# the splits of its profiles' groups by the primary key. A split binds the groups the two
# profiles belong to, whatever merges happen later; removing it (the API) allows the link.
profile_splits = Table(
    "profile_splits",
    metadata,
    Column(
        "profile_id",
        UUID(as_uuid=True),
        ForeignKey("profiles.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "other_id",
        UUID(as_uuid=True),
        ForeignKey("profiles.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("merge_id", BigInteger, nullable=True),  # the merge whose undoing made it
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    PrimaryKeyConstraint("profile_id", "other_id", name="profile_splits_pkey"),
)

# A link an event asked for and the identity rules refused (a per-type limit, a split): which
# identifier, which profile got the event, which profile held the identifier.
identity_refusals = Table(
    "identity_refusals",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("profile_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=False),
    Column("type", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("other_profile_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=True),
    Column("reason", Text, nullable=False),
    Column("source_id", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Index("identity_refusals_profile_idx", "profile_id"),
)

# Profile updates written in the resolver's transaction and relayed to
# cdp.profile-updates after it commits (a crash in between loses nothing). The payload is
# the record's JSON object as published (Postgres never parses it), without its events:
# those are named by (source, message) and read from ``events`` as the row is relayed, so
# a row stays a few hundred bytes (no TOAST) and an event is not written twice. NULL
# arrays: the payload is the whole record (a tombstone). Rows live for milliseconds: the
# resolvers vacuum the table as they relay, and its autovacuum settings (migration 0006)
# are those of a queue.
profile_update_outbox = Table(
    "profile_update_outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("event_sources", ARRAY(Text), nullable=True),
    Column("event_messages", ARRAY(Text), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

# Every accepted event once: (source_id, message_id) is the redelivery guard.
events = Table(
    "events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("source_id", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("profile_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=False),
    Column("type", Text, nullable=False),
    Column("event", Text, nullable=True),
    Column("channel", Text, nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=False),
    # The profile it first attached to: what an unmerge regroups by.
    Column("origin_profile_id", UUID(as_uuid=True), nullable=False),
    UniqueConstraint("source_id", "message_id", name="events_source_message_key"),
    Index("events_profile_timeline_idx", "profile_id", "timestamp", "id"),
    # The last hour's events (GET /v1/status): rows arrive in this order (migration 0012).
    Index("events_received_at_brin", "received_at", postgresql_using="brin"),
)

# Every order report (Order Completed / Order Refunded event) once, attached to a profile
# as its event is: the profile holds only the totals (cdp_stream.resolver.orders).
orders = Table(
    "orders",
    metadata,
    Column("source_id", Text, primary_key=True),
    Column("message_id", Text, primary_key=True),
    Column("profile_id", UUID(as_uuid=True), ForeignKey("profiles.id"), nullable=False),
    # The profile its event first attached to: what an unmerge regroups by.
    Column("origin_profile_id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),  # order | refund
    Column("order_id", Text, nullable=True),
    Column("currency", Text, nullable=False),
    Column("micros", BigInteger, nullable=True),  # null: a refund of the whole order
    CheckConstraint("kind IN ('order', 'refund')", name="orders_kind_check"),
    Index("orders_profile_idx", "profile_id", "order_id"),
    Index("orders_origin_idx", "origin_profile_id"),
)

# --- activation (cdp_stream.activation) --------------------------------------------------

# One CRM contact per canonical profile that has an email or a user id.
crm_contacts = Table(
    "crm_contacts",
    metadata,
    Column("profile_id", UUID(as_uuid=True), primary_key=True),
    Column("email", Text),
    Column("phone", Text),
    Column("user_id", Text),
    Column("first_name", Text),
    Column("last_name", Text),
    Column("company", Text),
    Column("job_title", Text),
    Column("lifecycle_stage", Text, nullable=False),  # subscriber / lead / customer
    Column("first_touch_source", Text),
    Column("last_activity_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

# Interactions worth a salesperson's eye, one per source event.
crm_interactions = Table(
    "crm_interactions",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("profile_id", UUID(as_uuid=True), nullable=False),
    Column("source_id", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("details", JSONB, nullable=False, server_default=_empty_object),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    UniqueConstraint("source_id", "message_id", name="crm_interactions_event_key"),
    Index("crm_interactions_timeline_idx", "profile_id", "occurred_at", "id"),
)

# The outbound CRM webhook's queue: pending -> delivered, or dead after N attempts.
crm_webhook_deliveries = Table(
    "crm_webhook_deliveries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("kind", Text, nullable=False),  # contact / interaction
    Column("payload", JSONB, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("delivered_at", DateTime(timezone=True)),
    Index("crm_webhook_deliveries_due_idx", "status", "next_attempt_at"),
)

audiences = Table(
    "audiences",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("rule", JSONB, nullable=False),
    Column("backfill", JSONB, nullable=False, server_default=_empty_object),  # progress
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

audience_members = Table(
    "audience_members",
    metadata,
    Column(
        "audience_id",
        UUID(as_uuid=True),
        ForeignKey("audiences.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("profile_id", UUID(as_uuid=True), nullable=False),
    Column("entered_at", DateTime(timezone=True), nullable=False, server_default=_now),
    PrimaryKeyConstraint("audience_id", "profile_id", name="audience_members_pkey"),
    Index("audience_members_profile_idx", "profile_id"),
)

# Every enter / exit, with its time.
audience_changes = Table(
    "audience_changes",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "audience_id",
        UUID(as_uuid=True),
        ForeignKey("audiences.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("profile_id", UUID(as_uuid=True), nullable=False),
    Column("change", Text, nullable=False),  # enter / exit
    Column("at", DateTime(timezone=True), nullable=False, server_default=_now),
    Index("audience_changes_audience_idx", "audience_id", "at"),
)

# Anonymized audience sizes for the DMP: counts per window and coarse bucket, nothing else.
dmp_audience_counts = Table(
    "dmp_audience_counts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "audience_id",
        UUID(as_uuid=True),
        ForeignKey("audiences.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("window", Text, nullable=False),  # hour / day
    Column("window_start", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("dimension", Text, nullable=False),  # overall / country / ...
    Column("bucket", Text, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("epsilon", Float),  # the Laplace noise's epsilon, None without noise
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    UniqueConstraint(
        "audience_id",
        "window",
        "window_start",
        "dimension",
        "bucket",
        name="dmp_audience_counts_key",
    ),
)

# Deleted people's identifiers, sealed (cdp_stream.profiles.suppression): late events for
# them are refused, not resurrected. key_id: the key that sealed it (NULL: plain SHA-256).
suppressed_identifiers = Table(
    "suppressed_identifiers",
    metadata,
    Column("digest", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("key_id", Text),
)

# Records a consumer could never apply, parked on the dead-letter topic (where the record
# itself is kept): one row each, so /metrics counts them across every process.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("consumer", Text, nullable=False),
    Column("origin", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

# The embedded bus (cdp_stream.bus.postgres): a Kafka-shaped log on tables. A topic has
# partitions; each partition counts its offsets in bus_partitions.next_offset (the row lock
# taken there by a publisher orders offsets by commit); bus_records holds the log; a
# consumer group's committed offsets are bus_offsets. Ids name topics and groups in the
# advisory-lock keys of group membership.
bus_topics = Table(
    "bus_topics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False, unique=True),
    Column("partitions", Integer, nullable=False),
)

bus_partitions = Table(
    "bus_partitions",
    metadata,
    Column("topic_id", Integer, ForeignKey("bus_topics.id"), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("topic_id", "partition", name="bus_partitions_pkey"),
)

bus_records = Table(
    "bus_records",
    metadata,
    Column("topic_id", Integer, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    PrimaryKeyConstraint("topic_id", "partition", "offset", name="bus_records_pkey"),
)

bus_groups = Table(
    "bus_groups",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False, unique=True),
)

bus_offsets = Table(
    "bus_offsets",
    metadata,
    Column("group_id", Integer, ForeignKey("bus_groups.id"), nullable=False),
    Column("topic_id", Integer, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("group_id", "topic_id", "partition", name="bus_offsets_pkey"),
)
