"""Activation: CRM contacts, interactions and webhook deliveries; audiences and their
members; anonymized DMP counts; the suppression list of deleted people.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_now = sa.text("now()")
_empty = sa.text("'{}'::jsonb")


def _at(name: str, nullable: bool = False) -> sa.Column[object]:
    default = None if nullable else _now
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, server_default=default)


def upgrade() -> None:
    op.create_table(
        "crm_contacts",
        sa.Column("profile_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("first_name", sa.Text),
        sa.Column("last_name", sa.Text),
        sa.Column("company", sa.Text),
        sa.Column("job_title", sa.Text),
        sa.Column("lifecycle_stage", sa.Text, nullable=False),
        sa.Column("first_touch_source", sa.Text),
        _at("last_activity_at", nullable=True),
        _at("created_at"),
        _at("updated_at"),
    )
    op.create_table(
        "crm_interactions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("profile_id", UUID(as_uuid=True), nullable=False),
        sa.Column("source_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        _at("occurred_at"),
        sa.Column("details", JSONB, nullable=False, server_default=_empty),
        _at("created_at"),
        sa.UniqueConstraint("source_id", "message_id", name="crm_interactions_event_key"),
    )
    op.create_index(
        "crm_interactions_timeline_idx", "crm_interactions", ["profile_id", "occurred_at", "id"]
    )
    op.create_table(
        "crm_webhook_deliveries",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        _at("next_attempt_at"),
        sa.Column("last_error", sa.Text),
        _at("created_at"),
        _at("delivered_at", nullable=True),
    )
    op.create_index(
        "crm_webhook_deliveries_due_idx", "crm_webhook_deliveries", ["status", "next_attempt_at"]
    )
    op.create_table(
        "audiences",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("rule", JSONB, nullable=False),
        sa.Column("backfill", JSONB, nullable=False, server_default=_empty),
        _at("created_at"),
    )
    op.create_table(
        "audience_members",
        sa.Column(
            "audience_id",
            UUID(as_uuid=True),
            sa.ForeignKey("audiences.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("profile_id", UUID(as_uuid=True), nullable=False),
        _at("entered_at"),
        sa.PrimaryKeyConstraint("audience_id", "profile_id", name="audience_members_pkey"),
    )
    op.create_index("audience_members_profile_idx", "audience_members", ["profile_id"])
    op.create_table(
        "audience_changes",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "audience_id",
            UUID(as_uuid=True),
            sa.ForeignKey("audiences.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("profile_id", UUID(as_uuid=True), nullable=False),
        sa.Column("change", sa.Text, nullable=False),
        _at("at"),
    )
    op.create_index("audience_changes_audience_idx", "audience_changes", ["audience_id", "at"])
    op.create_table(
        "dmp_audience_counts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "audience_id",
            UUID(as_uuid=True),
            sa.ForeignKey("audiences.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("window", sa.Text, nullable=False),
        _at("window_start"),
        sa.Column("dimension", sa.Text, nullable=False),
        sa.Column("bucket", sa.Text, nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("epsilon", sa.Float),
        _at("created_at"),
        sa.UniqueConstraint(
            "audience_id",
            "window",
            "window_start",
            "dimension",
            "bucket",
            name="dmp_audience_counts_key",
        ),
    )
    op.create_table(
        "suppressed_identifiers",
        sa.Column("digest", sa.Text, primary_key=True),
        _at("created_at"),
    )


def downgrade() -> None:
    for table in (
        "suppressed_identifiers",
        "dmp_audience_counts",
        "audience_changes",
        "audience_members",
        "audiences",
        "crm_webhook_deliveries",
        "crm_interactions",
        "crm_contacts",
    ):
        op.drop_table(table)
