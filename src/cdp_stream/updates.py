"""The wire contract of ``cdp.profile-updates``: :class:`ProfileUpdate`, one model for the
producers (the resolver's batches, the API's erasure tombstones) and the consumer
(activation); ``schemas/profile-update.json`` is generated from it.

An update says which canonical profile changed and how: the profiles merged into it, the
traits and computed traits whose values changed, and the events that changed it (added
by the outbox relay, see ``cdp_stream.profiles.outbox.take_outbox``). A tombstone
(``type: deleted``) says a person was erased: every profile of theirs is gone.

``version`` is the contract's version: a consumer refuses (dead-letters) an update of a
version it does not know rather than misreading it; a change that old consumers can read
(a new optional field) keeps the version. Updates written before the field existed are
version 1. Not here: what a consumer does with an update.
"""

from __future__ import annotations

import logging
import uuid
from functools import cached_property
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

VERSION: Literal[1] = 1


class ProfileUpdate(BaseModel):
    """One record on ``cdp.profile-updates`` (key: the canonical profile id)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal[1] = Field(default=VERSION, description="the contract's version")
    type: Literal["updated", "deleted"] = Field(
        default="updated", description="updated: the profile changed; deleted: it was erased"
    )
    profile_id: str = Field(description="the canonical profile")
    merged_ids: list[str] = Field(
        default=[], description="profiles merged into it (deleted: every profile erased)"
    )
    changed_traits: dict[str, Any] = Field(default={}, description="trait -> new value")
    changed_computed: dict[str, Any] = Field(default={}, description="computed trait -> new value")
    split_from: str | None = Field(
        default=None,
        description="from an unmerge: the other profile of the two it made (whose events "
        "and identities may have been this one's a moment ago)",
    )
    events: list[dict[str, Any]] = Field(
        default=[], description="the events (as on cdp.events) that changed the profile"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_event(cls, data: Any) -> Any:
        """Updates written before ``events`` carried their one event as ``event``."""
        if isinstance(data, dict) and "events" not in data and data.get("event") is not None:
            return {**data, "events": [data["event"]]}
        return data

    def profile_ids(self) -> list[uuid.UUID]:
        """Every profile the update names: its profile first, then those merged into it
        (a tombstone: erased with it). One that is not a UUID is logged and left out: an
        update from a foreign producer must not stop the consumer."""
        return list(self._ids)

    @cached_property
    def _ids(self) -> tuple[uuid.UUID, ...]:
        """Parsed once: activation asks for them several times per update."""
        ids = []
        for raw in [self.profile_id, *self.merged_ids]:
            found = _uuid(raw)
            if found is None:
                log.warning("skipping a profile id that is not a UUID: %r", raw)
            else:
                ids.append(found)
        return tuple(ids)

    def split_ids(self) -> list[uuid.UUID]:
        """Both profiles an unmerge made (this one and ``split_from``), else none."""
        other = _uuid(self.split_from)
        return [] if other is None else [*self.profile_ids()[:1], other]

    def payload(self, *, without_events: bool = False) -> bytes:
        """The record's JSON; ``without_events`` leaves ``events`` for the relay to add."""
        return self.model_dump_json(exclude={"events"} if without_events else None).encode()


def _uuid(value: str | None) -> uuid.UUID | None:
    if value is None:  # most updates have no ``split_from``: no exception raised for them
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def updated_payload(
    profile_id: str,
    merged_ids: list[str],
    changed_traits: dict[str, Any],
    changed_computed: dict[str, Any],
    split_from: str | None = None,
) -> bytes:
    """``ProfileUpdate(...).payload(without_events=True)`` of an ``updated`` update, the
    same bytes, without building the model: the resolver writes one per profile per batch
    from values of its own, and validating them cost ~10 µs an update against ~1 µs here
    (a test keeps the two equal)."""
    return orjson.dumps(
        {
            "version": VERSION,
            "type": "updated",
            "profile_id": profile_id,
            "merged_ids": merged_ids,
            "changed_traits": changed_traits,
            "changed_computed": changed_computed,
            "split_from": split_from,
        }
    )
