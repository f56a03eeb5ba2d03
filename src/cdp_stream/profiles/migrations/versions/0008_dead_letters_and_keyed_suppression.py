"""Dead letters counted; the suppression list keyed.

``dead_letters``: one row per record a consumer parked on the dead-letter topic (see
:mod:`cdp_stream.poison`), so ``/metrics`` counts them across every process.

``suppressed_identifiers.key_id``: which key made the digest (see
:mod:`cdp_stream.profiles.suppression`). Existing rows are plain SHA-256 digests and get
no key id (NULL): ``cdp-stream suppression-rekey`` (also run by every resolver at start)
rewrites them with the configured key; they keep blocking meanwhile.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.add_column("suppressed_identifiers", sa.Column("key_id", sa.Text))


def downgrade() -> None:
    op.drop_column("suppressed_identifiers", "key_id")
    op.drop_table("dead_letters")
