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
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.api import crm_service
from cdp_stream.api.deps import Conn, bearer, cursor_at, position
from cdp_stream.api.profiles import Profile

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


async def _contact(conn: AsyncConnection, profile_id: uuid.UUID) -> crm_service.Contact:
    found = await crm_service.contact(conn, profile_id)
    if found is None:
        raise HTTPException(404, f"profile {profile_id} has no CRM contact")
    return found


@router.get("/contacts/{ref}", response_model=ContactOut, **READ)
async def get_contact(profile_id: Profile, conn: Conn) -> crm_service.Contact:
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
    before = position(cursor) if cursor else None
    rows = await crm_service.interactions(conn, profile_id, limit + 1, before)
    page = rows[:limit]
    return {
        "items": page,
        "next": cursor_at(page[-1].occurred_at, page[-1].id) if len(rows) > limit else None,
    }
