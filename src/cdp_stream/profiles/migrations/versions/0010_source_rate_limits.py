"""Sources: their own rate limit (events per second and burst); NULL means the default.

Revision ID: 0010
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sources", sa.Column("rate_limit_per_s", sa.Float))
    op.add_column("sources", sa.Column("rate_limit_burst", sa.Integer))


def downgrade() -> None:
    op.drop_column("sources", "rate_limit_burst")
    op.drop_column("sources", "rate_limit_per_s")
