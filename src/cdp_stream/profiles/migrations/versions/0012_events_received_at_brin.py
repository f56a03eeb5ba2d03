"""Events: a BRIN index on received_at, for "events stored in the last hour" (the console's
health page, ``GET /v1/status``) without scanning the whole table.

BRIN, not B-tree: rows arrive in received_at order, so a block range summary finds the
last hour's pages; the index is a few kB per GB of events, and the resolver's COPY into
``events`` showed no measurable cost from it (300,000 rows, with and without). Built
``CONCURRENTLY``: the resolvers' ``COPY`` into ``events`` goes on meanwhile.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

from cdp_stream.profiles.migrate import create_index_online

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_index_online(
        "events_received_at_brin", "events", ["received_at"], postgresql_using="brin"
    )


def downgrade() -> None:
    op.drop_index("events_received_at_brin", table_name="events")
