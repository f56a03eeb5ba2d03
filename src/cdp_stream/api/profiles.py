"""``/v1/profiles``: one profile per person, found by profile id or by any identifier."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel

from cdp_stream.api.deps import Conn, require_scope
from cdp_stream.profiles import repository as repo
from cdp_stream.resolver.identity import parse_ref

router = APIRouter(prefix="/v1/profiles", tags=["profiles"])


class IdentityOut(BaseModel):
    type: str
    value: str


class ProfileOut(BaseModel):
    id: str
    identities: list[IdentityOut]
    traits: dict[str, Any]
    computed: dict[str, Any]
    created_at: datetime
    updated_at: datetime


async def resolve_ref(conn: Conn, ref: str) -> uuid.UUID:
    """A profile id or ``type:value`` -> the canonical profile id, or 404."""
    try:
        found = await repo.canonical_id(conn, uuid.UUID(ref))
    except ValueError:
        ident = parse_ref(ref)
        found = None if ident is None else await repo.profile_for_identifier(conn, ident)
    if found is None:
        raise HTTPException(404, f"no profile for {ref!r}")
    return found


@router.get(
    "/{ref}", response_model=ProfileOut, dependencies=[Depends(require_scope("profiles:read"))]
)
async def get_profile(ref: str, conn: Conn) -> dict[str, Any]:
    profile = await repo.read_profile(conn, await resolve_ref(conn, ref))
    if profile is None:
        raise HTTPException(404, f"no profile for {ref!r}")
    return profile
