"""``/v1/audiences``: define audiences by rule (see ``activation/rules.py``), change
them, read their size (now and over time) and back-fill progress, delete them; and
``/v1/profiles/{ref}/audiences``, the audiences a person is in.

Creating one commits it first and then back-fills it in the background (existing
profiles), while the activation consumer keeps it current from then on (profiles that
change). A bad rule is a 422 listing each problem with its JSON path inside ``rule``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation import audiences
from cdp_stream.activation.rules import Rule, RuleError, parse_rule
from cdp_stream.api.deps import Conn, bearer
from cdp_stream.api.profiles import Profile

router = APIRouter(prefix="/v1/audiences", tags=["audiences"])
# The audiences a person is in, beside the person's other reads.
profile_router = APIRouter(prefix="/v1/profiles", tags=["audiences"])


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class AudienceIn(BaseModel):
    name: Name
    rule: dict[str, Any] = Field(description="the rule, in the language of activation/rules.py")


class Created(BaseModel):
    id: str


class AudienceOut(BaseModel):
    id: str
    name: str
    rule: dict[str, Any]
    size: int = Field(description="current members")
    backfill: dict[str, Any] = Field(description='{"status", "processed", "total"}')
    created_at: datetime


def _parsed(rule: dict[str, Any]) -> Rule:
    """The rule, or a 422 listing each problem at its place inside ``rule``."""
    try:
        return parse_rule(rule)
    except RuleError as exc:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["body", "rule", *p.loc],
                    "path": p.path,
                    "msg": p.message,
                    "type": p.type,
                }
                for p in exc.problems
            ],
        ) from None


@router.post(
    "", status_code=201, response_model=Created, **bearer("audiences:write", 400, 409, 422)
)
async def create(request: Request, body: AudienceIn) -> dict[str, str]:
    rule = _parsed(body.rule)
    engine: AsyncEngine = request.app.state.engine
    async with engine.begin() as conn:  # committed before the back-fill looks for it
        audience_id = await audiences.create_audience(conn, body.name, rule)
    if audience_id is None:
        raise HTTPException(409, f"an audience named {body.name!r} exists")
    audiences.start_backfill(engine, audience_id)
    return {"id": str(audience_id)}


class AudienceChange(BaseModel):
    """What to change; a new rule back-fills the audience again (members it no longer
    admits exit)."""

    name: Name | None = None
    rule: dict[str, Any] | None = None


@router.patch(
    "/{audience_id}", response_model=AudienceOut, **bearer("audiences:write", 400, 404, 409, 422)
)
async def change(request: Request, audience_id: uuid.UUID, body: AudienceChange) -> dict[str, Any]:
    rule = None if body.rule is None else _parsed(body.rule)
    engine: AsyncEngine = request.app.state.engine
    async with engine.begin() as conn:  # committed before the back-fill looks for it
        done = await audiences.update_audience(conn, audience_id, body.name, rule)
    if done is None:
        raise HTTPException(404, f"no audience {audience_id}")
    if done is False:
        raise HTTPException(409, f"an audience named {body.name!r} exists")
    if rule is not None:
        audiences.start_backfill(engine, audience_id)
    async with engine.connect() as conn:
        found = await audiences.read_audience(conn, audience_id)
    if found is None:  # deleted in between
        raise HTTPException(404, f"no audience {audience_id}")
    return found


@router.get("", response_model=list[AudienceOut], **bearer("profiles:read"))
async def list_all(conn: Conn) -> list[dict[str, Any]]:
    return await audiences.list_audiences(conn)


@router.get("/{audience_id}", response_model=AudienceOut, **bearer("profiles:read", 404, 422))
async def get_one(audience_id: uuid.UUID, conn: Conn) -> dict[str, Any]:
    found = await audiences.read_audience(conn, audience_id)
    if found is None:
        raise HTTPException(404, f"no audience {audience_id}")
    return found


@router.delete("/{audience_id}", status_code=204, **bearer("audiences:write", 404, 422))
async def delete(audience_id: uuid.UUID, conn: Conn) -> None:
    if not await audiences.delete_audience(conn, audience_id):
        raise HTTPException(404, f"no audience {audience_id}")


class SizeAt(BaseModel):
    at: datetime = Field(description="the start of the step")
    size: int = Field(description="members at the end of the step")


@router.get(
    "/{audience_id}/sizes", response_model=list[SizeAt], **bearer("profiles:read", 404, 422)
)
async def get_sizes(
    audience_id: uuid.UUID,
    conn: Conn,
    step: Literal["minute", "hour", "day"] = "hour",
    points: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[dict[str, Any]]:
    """Its size over time, from its enter / exit history: one point per step it changed in."""
    if await audiences.read_audience(conn, audience_id) is None:
        raise HTTPException(404, f"no audience {audience_id}")
    return await audiences.size_history(conn, audience_id, step, points)


class Membership(BaseModel):
    id: str
    name: str
    entered_at: datetime


@profile_router.get(
    "/{ref}/audiences", response_model=list[Membership], **bearer("profiles:read", 400, 404, 422)
)
async def get_profile_audiences(profile_id: Profile, conn: Conn) -> list[dict[str, Any]]:
    """The audiences the person is in now."""
    return await audiences.audiences_of(conn, profile_id)
