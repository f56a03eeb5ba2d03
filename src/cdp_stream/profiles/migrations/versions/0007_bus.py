"""The embedded bus: a Kafka-shaped log on tables (``cdp_stream.bus.postgres``).

Topics with partitions and a per-partition offset counter, the records, consumer groups
and their committed offsets. ``cdp-stream up`` without Kafka publishes here, so an event
is acknowledged only once its row is committed.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bus_topics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("partitions", sa.Integer, nullable=False),
    )
    op.create_table(
        "bus_partitions",
        sa.Column("topic_id", sa.Integer, sa.ForeignKey("bus_topics.id"), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("topic_id", "partition", name="bus_partitions_pkey"),
    )
    op.create_table(
        "bus_records",
        sa.Column("topic_id", sa.Integer, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("topic_id", "partition", "offset", name="bus_records_pkey"),
    )
    op.create_table(
        "bus_groups",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
    )
    op.create_table(
        "bus_offsets",
        sa.Column("group_id", sa.Integer, sa.ForeignKey("bus_groups.id"), nullable=False),
        sa.Column("topic_id", sa.Integer, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("group_id", "topic_id", "partition", name="bus_offsets_pkey"),
    )


def downgrade() -> None:
    for table in ("bus_offsets", "bus_groups", "bus_records", "bus_partitions", "bus_topics"):
        op.drop_table(table)
