"""Identity resolution: trait state with set-once, undoable merges, refused links, outbox.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.add_column(
        "profiles",
        sa.Column("trait_state", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.drop_column("profiles", "trait_ts")
    op.add_column("profile_merges", sa.Column("undone_at", sa.DateTime(timezone=True)))
    # The profile an identity was first claimed by and an event first attached to: the
    # atoms an unmerge regroups by replaying the merge log.
    op.add_column("identities", sa.Column("claimed_by", UUID(as_uuid=True)))
    op.execute("UPDATE identities SET claimed_by = profile_id")
    op.alter_column("identities", "claimed_by", nullable=False)
    op.add_column("events", sa.Column("origin_profile_id", UUID(as_uuid=True)))
    op.execute("UPDATE events SET origin_profile_id = profile_id")
    op.alter_column("events", "origin_profile_id", nullable=False)
    op.create_table(
        "identity_refusals",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("profile_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("other_profile_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id")),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("source_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_index("identity_refusals_profile_idx", "identity_refusals", ["profile_id"])
    op.create_table(
        "profile_update_outbox",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )


def downgrade() -> None:
    op.drop_column("events", "origin_profile_id")
    op.drop_column("identities", "claimed_by")
    op.drop_table("profile_update_outbox")
    op.drop_index("identity_refusals_profile_idx", "identity_refusals")
    op.drop_table("identity_refusals")
    op.drop_column("profile_merges", "undone_at")
    op.add_column(
        "profiles",
        sa.Column("trait_ts", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.drop_column("profiles", "trait_state")
