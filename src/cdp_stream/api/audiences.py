"""``/v1/audiences``: define audiences by rule (see ``activation/rules.py``), change
them, read their size (now and over time) and back-fill progress, list and export their
members, delete them (the audiences a person is in: ``api/profiles.py``).

Sizes need ``profiles:read``; members (who, with their identifiers: personal data in bulk)
need ``audiences:members``, which a token for counts alone does not carry.

Creating one commits it first and then back-fills it in the background (existing
profiles), while the activation consumer keeps it current from then on (profiles that
change). A bad rule is a 422 listing each problem with its JSON path inside ``rule``.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.activation import audiences
from cdp_stream.activation.audiences.rules import Rule, RuleError, parse_rule
from cdp_stream.api.deps import Conn, bearer

router = APIRouter(prefix="/v1/audiences", tags=["audiences"])
# The audiences a person is in, beside the person's other reads.


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


class MemberOut(BaseModel):
    profile_id: str
    entered_at: datetime
    identifiers: dict[str, str] = Field(
        description="per identifier type the value linked most recently (user_id, email, "
        "phone, anonymous_id, device_id, advertising_id; absent types left out)"
    )


class MemberPage(BaseModel):
    items: list[MemberOut]
    next: str | None = Field(description="the cursor of the next page; null on the last")


MEMBERS = "audiences:members"  # personal data: not the scope of sizes and DMP counts


async def _existing(conn: AsyncConnection, audience_id: uuid.UUID) -> None:
    if not await audiences.audience_exists(conn, audience_id):
        raise HTTPException(404, f"no audience {audience_id}")


@router.get("/{audience_id}/members", response_model=MemberPage, **bearer(MEMBERS, 400, 404, 422))
async def members(
    audience_id: uuid.UUID,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Who is in the audience, in a stable order, ``limit`` at a time; ``next`` pages on."""
    await _existing(conn, audience_id)
    page = await audiences.read_members(
        conn, audience_id, after=_after(cursor) if cursor else None, limit=limit + 1
    )
    more = len(page) > limit
    return {"items": page[:limit], "next": _cursor(page[limit - 1]) if more else None}


def _cursor(member: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(member["profile_id"]).bytes).decode()


def _after(cursor: str) -> uuid.UUID:
    try:
        return uuid.UUID(bytes=base64.urlsafe_b64decode(cursor.encode()))
    except ValueError as exc:  # binascii.Error is one
        raise HTTPException(400, "invalid cursor") from exc


_CSV = bearer(MEMBERS, 404, 422)
_CSV["responses"] = {
    **_CSV["responses"],
    200: {
        "description": "a header line, then one line per member: "
        + ",".join(audiences.MEMBER_COLUMNS),
        "content": {"text/csv": {"schema": {"type": "string"}}},
    },
}


@router.get("/{audience_id}/members.csv", response_class=StreamingResponse, **_CSV)
async def export(request: Request, audience_id: uuid.UUID) -> StreamingResponse:
    """Every member as CSV, streamed from a cursor: any size, in flat memory."""
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as conn:
        await _existing(conn, audience_id)
    return StreamingResponse(
        audiences.members_csv(engine, audience_id),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="audience-{audience_id}.csv"'},
    )


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
