"""The webhook messages one batch of the CRM feed queues, in the order they are made:
``contact.upserted`` / ``contact.merged`` / ``contact.deleted`` and
``interaction.created`` (their shapes: docs/crm-webhook.md). Pure: the feed adds them,
``repository.queue_deliveries`` stores them, ``webhook.py`` sends them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp_stream.activation.crm.contacts import contact_json
from cdp_stream.activation.crm.interactions import interaction_json


@dataclass
class Outgoing:
    """Webhook deliveries of one batch (``crm_webhook_deliveries`` rows), in order."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def _add(self, kind: str, payload: dict[str, Any]) -> None:
        self.rows.append({"kind": kind, "payload": payload})

    def merged(self, merged: uuid.UUID, into: uuid.UUID) -> None:
        """A contact merged away into another: the CRM moves its interactions."""
        self._add(
            "contact",
            {"type": "contact.merged", "profile_id": str(merged), "merged_into": str(into)},
        )

    def upserted(self, contact: Mapping[str, Any], *, created: bool) -> None:
        """A contact (its stored row) created or changed."""
        pid = contact["profile_id"]
        self._add(
            "contact",
            {
                "type": "contact.upserted",
                "profile_id": str(pid),
                "created": created,
                "contact": contact_json(pid, contact),
            },
        )

    def deleted(self, profile_id: uuid.UUID, merged_ids: list[uuid.UUID], reason: str) -> None:
        """A contact gone: ``no_identifier`` (lost its email and user id) or ``erased``."""
        self._add(
            "contact",
            {
                "type": "contact.deleted",
                "profile_id": str(profile_id),
                "merged_ids": [str(m) for m in merged_ids],
                "reason": reason,
            },
        )

    def interaction(self, row: Mapping[str, Any]) -> None:
        """An interaction (its stored row) the CRM has not seen."""
        item = interaction_json(row)
        self._add(
            "interaction",
            {"type": "interaction.created", "profile_id": item["profile_id"], "interaction": item},
        )
