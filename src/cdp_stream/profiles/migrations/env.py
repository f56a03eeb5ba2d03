"""Alembic environment: runs on the connection handed in by ``profiles.migrate``, a
transaction per revision (so a revision may build an index ``CONCURRENTLY``)."""

from __future__ import annotations

from alembic import context

from cdp_stream.profiles.models import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
