"""The webhook messages of one CRM feed batch (:mod:`cdp_stream.activation.crm.messages`):
their shapes and order, pure, no database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from cdp_stream.activation.crm.messages import Outgoing


def test_messages_keep_their_order_and_shapes() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    at = datetime(2024, 3, 1, 10, tzinfo=UTC)
    out = Outgoing()
    out.merged(a, b)
    out.upserted({"profile_id": b, "email": "x@example.com", "updated_at": at}, created=True)
    out.interaction(
        {
            "id": 7,
            "profile_id": b,
            "source_id": "s",
            "message_id": "m",
            "kind": "signed_up",
            "occurred_at": at,
            "details": {},
        }
    )
    out.deleted(b, [a], "erased")
    assert [(r["kind"], r["payload"]["type"]) for r in out.rows] == [
        ("contact", "contact.merged"),
        ("contact", "contact.upserted"),
        ("interaction", "interaction.created"),
        ("contact", "contact.deleted"),
    ]
    merged, upserted, interaction, deleted = (r["payload"] for r in out.rows)
    assert merged == {"type": "contact.merged", "profile_id": str(a), "merged_into": str(b)}
    assert upserted["created"] is True and upserted["profile_id"] == str(b)
    assert upserted["contact"]["email"] == "x@example.com"
    assert upserted["contact"]["updated_at"] == "2024-03-01T10:00:00+00:00"
    assert interaction["interaction"]["occurred_at"] == "2024-03-01T10:00:00+00:00"
    assert interaction["profile_id"] == str(b) and interaction["interaction"]["id"] == 7
    assert deleted == {
        "type": "contact.deleted",
        "profile_id": str(b),
        "merged_ids": [str(a)],
        "reason": "erased",
    }
