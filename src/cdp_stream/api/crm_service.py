"""The CRM routes' reads of the CRM feed's tables (``crm_contacts``,
``crm_interactions``), out of the router.

They stay here, beside the router, while ``activation/`` is split into subpackages: the
CRM's own repository is their home once it exists.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import crm_contacts, crm_interactions


@dataclass(frozen=True, slots=True)
class Contact:
    profile_id: str
    email: str | None
    phone: str | None
    user_id: str | None
    first_name: str | None
    last_name: str | None
    company: str | None
    job_title: str | None
    lifecycle_stage: str
    first_touch_source: str | None
    last_activity_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Interaction:
    id: int
    source_id: str
    message_id: str
    kind: str
    occurred_at: datetime
    details: dict[str, Any]


_CONTACT_FIELDS = tuple(f.name for f in fields(Contact))
_INTERACTION_FIELDS = tuple(f.name for f in fields(Interaction))


async def contact(conn: AsyncConnection, profile_id: uuid.UUID) -> Contact | None:
    """The profile's CRM contact, or None (no email, no user id yet)."""
    row = (
        await conn.execute(
            select(*(crm_contacts.c[f] for f in _CONTACT_FIELDS)).where(
                crm_contacts.c.profile_id == profile_id
            )
        )
    ).one_or_none()
    if row is None:
        return None
    return Contact(**{**row._mapping, "profile_id": str(row.profile_id)})


async def interactions(
    conn: AsyncConnection,
    profile_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, int] | None,
) -> list[Interaction]:
    """A page of the profile's interactions, newest first: (occurred_at, id) below
    ``before``."""
    query = select(*(crm_interactions.c[f] for f in _INTERACTION_FIELDS)).where(
        crm_interactions.c.profile_id == profile_id
    )
    if before is not None:
        query = query.where(
            tuple_(crm_interactions.c.occurred_at, crm_interactions.c.id) < tuple_(*before)
        )
    rows = await conn.execute(
        query.order_by(crm_interactions.c.occurred_at.desc(), crm_interactions.c.id.desc()).limit(
            limit
        )
    )
    return [Interaction(**r._mapping) for r in rows]
