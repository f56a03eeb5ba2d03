"""Identities: the index by profile covers what is read by profile (type, value,
created_at), so those reads are index-only scans.

Activation reads the identities each contact shows (``crm.repository.read_held``: a
profile's emails, phones and user ids, oldest first) for every profile of every batch,
and the resolver reads every identity of the profiles a batch locks
(``resolver.repository.groups_of``). By ``profile_id`` alone each row found was a heap
page visited: 550 profiles' identities took ~7 ms, against ~3 ms index-only. The new
index replaces the old one, whose every use (``WHERE profile_id = ...``) it serves. Built
and dropped ``CONCURRENTLY``: the resolvers' claims go on meanwhile.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

from cdp_stream.profiles.migrate import create_index_online, drop_index_online

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_index_online(
        "identities_profile_type_idx",
        "identities",
        ["profile_id", "type"],
        postgresql_include=["value", "created_at"],
    )
    drop_index_online("identities_profile_id_idx", "identities")


def downgrade() -> None:
    op.create_index("identities_profile_id_idx", "identities", ["profile_id"])
    op.drop_index("identities_profile_type_idx", table_name="identities")
