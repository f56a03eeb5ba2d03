"""``/v1/audiences``: define audiences by rule (see ``activation/rules.py``), read their
size and back-fill progress, delete them.

Creating one commits it first and then back-fills it in the background (existing
profiles), while the activation consumer keeps it current from then on (profiles that
change). A bad rule is a 422 listing each problem with its JSON path inside ``rule``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation import audiences
from cdp_stream.activation.rules import RuleError, parse_rule
from cdp_stream.api.deps import Conn, bearer

router = APIRouter(prefix="/v1/audiences", tags=["audiences"])


class AudienceIn(BaseModel):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
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


@router.post(
    "", status_code=201, response_model=Created, **bearer("audiences:write", 400, 409, 422)
)
async def create(request: Request, body: AudienceIn) -> dict[str, str]:
    try:
        rule = parse_rule(body.rule)
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
    engine: AsyncEngine = request.app.state.engine
    async with engine.begin() as conn:  # committed before the back-fill looks for it
        audience_id = await audiences.create_audience(conn, body.name, rule)
    if audience_id is None:
        raise HTTPException(409, f"an audience named {body.name!r} exists")
    audiences.start_backfill(engine, audience_id)
    return {"id": str(audience_id)}


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
