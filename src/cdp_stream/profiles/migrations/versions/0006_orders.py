"""Orders in a table of their own; an outbox that does not bloat.

* ``orders``: one row per ``Order Completed`` / ``Order Refunded`` event, attached to a
  profile as its event is (``cdp_stream.resolver.orders``). Until now every order id
  lived in the profile's ``computed.ledger``, rewritten on every event and copied into
  every profile update: a busy shared profile grew to MiB and one update over Kafka's
  message limit stopped the relay. The rows are filled from the stored events, each
  profile's money fields summed again from them, and the ledgers dropped.
* ``profile_update_outbox``: one row per profile per resolver batch instead of one per
  event, and small: ``payload`` becomes ``bytea``, the record as published without its
  events (Postgres never parses it), which ``event_sources`` / ``event_messages`` name,
  read from ``events`` when the row is relayed. Every event was written twice and the
  rows were TOASTed; after a run the table held 20 MB for 45 live rows. The resolvers
  vacuum it as they relay, and it gets the autovacuum settings of a queue: rows live for
  milliseconds, so vacuum after a fixed number of dead rows (not a fraction of a table
  that is nearly always empty) and without cost pauses, for the heap and its TOAST.

Downgrade drops the rows and the settings; the ledgers are not rebuilt (older code reads
money fields without a ledger as orders without order ids).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from dataclasses import asdict

import orjson
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from cdp_stream.resolver.computed import ORDER_FIELDS
from cdp_stream.resolver.orders import fact_of, fields
from cdp_stream.resolver.repository import ORDER_TOTALS

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_QUEUE = (
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_vacuum_insert_threshold",
    "autovacuum_vacuum_cost_delay",
)
_QUEUE_VALUES = ("0", "500", "0", "500", "0")


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("source_id", sa.Text, primary_key=True),
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("profile_id", UUID(as_uuid=True), sa.ForeignKey("profiles.id"), nullable=False),
        sa.Column("origin_profile_id", UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("order_id", sa.Text, nullable=True),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("micros", sa.BigInteger, nullable=True),
        sa.CheckConstraint("kind IN ('order', 'refund')", name="orders_kind_check"),
    )
    op.create_index("orders_profile_idx", "orders", ["profile_id", "order_id"])
    op.create_index("orders_origin_idx", "orders", ["origin_profile_id"])
    _fill_orders()
    op.alter_column(
        "profile_update_outbox",
        "payload",
        type_=sa.LargeBinary,
        postgresql_using="convert_to(payload::text, 'UTF8')",
    )
    for column in ("event_sources", "event_messages"):
        op.add_column("profile_update_outbox", sa.Column(column, ARRAY(sa.Text), nullable=True))
    settings = ", ".join(
        f"{prefix}{name} = {value}"
        for prefix in ("", "toast.")
        for name, value in zip(_QUEUE, _QUEUE_VALUES, strict=True)
    )
    op.execute(f"ALTER TABLE profile_update_outbox SET ({settings})")


def _fill_orders() -> None:
    """Order rows from the stored purchase events; every profile that had money fields
    gets them summed again from those rows, and loses its ledger."""
    bind = op.get_bind()
    found = bind.execute(
        sa.text(
            "SELECT source_id, message_id, profile_id, origin_profile_id, payload FROM events"
            " WHERE type = 'track' AND lower(btrim(event)) IN ('order completed', 'order refunded')"
        )
    )
    rows = []
    for r in found:
        payload = r.payload if isinstance(r.payload, dict) else orjson.loads(r.payload)
        fact = fact_of(payload)
        if fact is not None:
            keys = ("source_id", "message_id", "profile_id", "origin_profile_id")
            rows.append({k: getattr(r, k) for k in keys} | asdict(fact))
    if rows:
        bind.execute(
            sa.text(
                "INSERT INTO orders (source_id, message_id, profile_id, origin_profile_id, kind,"
                " order_id, currency, micros) VALUES (:source_id, :message_id, :profile_id,"
                " :origin_profile_id, :kind, :order_id, :currency, :micros)"
            ),
            rows,
        )
    pids = list(
        bind.execute(
            sa.text(
                "SELECT id FROM profiles"
                " WHERE computed -> 'ledger' IS NOT NULL OR computed -> 'orders' IS NOT NULL"
            )
        ).scalars()
    )
    if not pids:
        return
    totals: dict[object, list[tuple[str, int, int]]] = {}
    for r in bind.execute(ORDER_TOTALS, {"pids": pids}):
        totals.setdefault(r.profile_id, []).append((r.currency, r.n, r.micros))
    stale = "ARRAY[" + ", ".join(f"'{f}'" for f in ("ledger", *ORDER_FIELDS)) + "]"
    bind.execute(
        sa.text(
            f"UPDATE profiles SET computed = (computed - {stale}::text[])"
            " || CAST(:money AS jsonb) WHERE id = :pid"
        ),
        [{"pid": pid, "money": orjson.dumps(fields(totals.get(pid, []))).decode()} for pid in pids],
    )


def downgrade() -> None:
    resets = ", ".join(f"{prefix}{name}" for prefix in ("", "toast.") for name in _QUEUE)
    op.execute(f"ALTER TABLE profile_update_outbox RESET ({resets})")
    # pending updates keep their events' names only: relay them before downgrading
    for column in ("event_sources", "event_messages"):
        op.drop_column("profile_update_outbox", column)
    op.alter_column(
        "profile_update_outbox",
        "payload",
        type_=JSONB,
        postgresql_using="convert_from(payload, 'UTF8')::jsonb",
    )
    op.drop_table("orders")
