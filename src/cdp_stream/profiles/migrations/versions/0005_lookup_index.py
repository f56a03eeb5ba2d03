"""Lookups: an index for the merged-away ids of a canonical profile.

``GET /v1/profiles/{ref}`` lists ``merged_from`` with ``WHERE merged_into = $1``; without an
index that was a sequential scan of every profile on each lookup (13 ms at 22,000
profiles, growing with the table). Built ``CONCURRENTLY``: profiles are written meanwhile.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cdp_stream.profiles.migrate import create_index_online

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_index_online(
        "profiles_merged_into_idx",
        "profiles",
        ["merged_into"],
        postgresql_where=sa.text("merged_into IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("profiles_merged_into_idx", table_name="profiles")
