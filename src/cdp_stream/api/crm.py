"""``/v1/crm/contacts``: the CRM feed's contacts and their interactions, for a CRM (or a
person) that reads instead of receiving the webhook.

``ref`` is what ``/v1/profiles`` takes (a profile id, a merged-away one too, or
``type:value``). A profile without a contact (no email, no user id yet) is a 404 on both
routes: its interactions are kept, and show here once it becomes a contact.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.api.deps import Conn, bearer, cursor_at, position
from cdp_stream.api.profiles import Profile
from cdp_stream.profiles.models import crm_contacts, crm_interactions

router = APIRouter(prefix="/v1/crm", tags=["crm"])
READ = bearer("profiles:read", 400, 404, 422)


class ContactOut(BaseModel):
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


class InteractionOut(BaseModel):
    id: int
    source_id: str
    message_id: str
    kind: str
    occurred_at: datetime
    details: dict[str, Any]


class InteractionPage(BaseModel):
    items: list[InteractionOut]
    next: str | None


async def _contact(conn: AsyncConnection, profile_id: uuid.UUID) -> dict[str, Any]:
    row = (
        await conn.execute(select(crm_contacts).where(crm_contacts.c.profile_id == profile_id))
    ).one_or_none()
    if row is None:
        raise HTTPException(404, f"profile {profile_id} has no CRM contact")
    return {**row._mapping, "profile_id": str(row.profile_id)}


@router.get("/contacts/{ref}", response_model=ContactOut, **READ)
async def get_contact(profile_id: Profile, conn: Conn) -> dict[str, Any]:
    return await _contact(conn, profile_id)


@router.get("/contacts/{ref}/interactions", response_model=InteractionPage, **READ)
async def get_interactions(
    profile_id: Profile,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """The contact's interactions, newest first, ``limit`` at a time; ``next`` pages on."""
    await _contact(conn, profile_id)
    query = select(crm_interactions).where(crm_interactions.c.profile_id == profile_id)
    if cursor:
        query = query.where(
            tuple_(crm_interactions.c.occurred_at, crm_interactions.c.id)
            < tuple_(*position(cursor))
        )
    rows = (
        await conn.execute(
            query.order_by(
                crm_interactions.c.occurred_at.desc(), crm_interactions.c.id.desc()
            ).limit(limit + 1)
        )
    ).all()
    page = rows[:limit]
    return {
        "items": [dict(r._mapping) for r in page],
        "next": cursor_at(page[-1].occurred_at, page[-1].id) if len(rows) > limit else None,
    }
