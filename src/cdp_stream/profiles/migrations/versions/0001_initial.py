"""Sources, API tokens, profiles, identities, merges and events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_now = sa.text("now()")
_empty = sa.text("'{}'::jsonb")


def _created_at() -> sa.Column[object]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now)


def upgrade() -> None:
    op.create_table(
        "sources",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("write_key", sa.Text, nullable=False, unique=True),
        _created_at(),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("scopes", ARRAY(sa.Text), nullable=False),
        _created_at(),
    )
    op.create_table(
        "profiles",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("merged_into", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=True),
        sa.Column("traits", JSONB, nullable=False, server_default=_empty),
        sa.Column("trait_ts", JSONB, nullable=False, server_default=_empty),
        sa.Column("computed", JSONB, nullable=False, server_default=_empty),
        _created_at(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_table(
        "identities",
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("profile_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("type", "value", name="identities_pkey"),
    )
    op.create_index("identities_profile_id_idx", "identities", ["profile_id"])
    op.create_table(
        "profile_merges",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("canonical_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=False),
        sa.Column("merged_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=False),
        sa.Column("source_id", sa.Text, nullable=True),
        sa.Column("message_id", sa.Text, nullable=True),
        _created_at(),
    )
    op.create_index("profile_merges_canonical_idx", "profile_merges", ["canonical_id"])
    op.create_index("profile_merges_merged_idx", "profile_merges", ["merged_id"])
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("source_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("profile_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=True),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.UniqueConstraint("source_id", "message_id", name="events_source_message_key"),
    )
    op.create_index("events_profile_timeline_idx", "events", ["profile_id", "timestamp", "id"])


def downgrade() -> None:
    for table in ("events", "profile_merges", "identities", "profiles", "api_tokens", "sources"):
        op.drop_table(table)
