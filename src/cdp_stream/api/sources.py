"""``/v1/sources``: where events come from. Create one to get a write key; list the web
origins whose pages may use it (the collector answers their CORS requests and refuses
the others, see ``collector/cors.py``). Admin scope: this decides who may write events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from cdp_stream.api.deps import Conn, require_scope
from cdp_stream.collector.cors import origin_pattern
from cdp_stream.profiles import credentials

router = APIRouter(prefix="/v1/sources", tags=["sources"])
ADMIN = [Depends(require_scope("admin"))]

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Origins = Annotated[
    list[Annotated[str, AfterValidator(origin_pattern)]],
    AfterValidator(lambda patterns: sorted(set(patterns))),  # stored normalized, once each
]


class SourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    allowed_origins: Origins = []


class SourceChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    allowed_origins: Origins | None = None


class SourceOut(BaseModel):
    id: str
    name: str
    write_key: str
    allowed_origins: list[str]
    created_at: datetime


@router.get("", response_model=list[SourceOut], dependencies=ADMIN)
async def list_all(conn: Conn) -> list[dict[str, Any]]:
    return await credentials.list_sources(conn)


@router.post("", status_code=201, response_model=SourceOut, dependencies=ADMIN)
async def create(body: SourceIn, conn: Conn) -> dict[str, Any] | None:
    source_id = await credentials.create_source(conn, body.name, body.allowed_origins)
    return await credentials.read_source(conn, source_id)


@router.patch("/{source_id}", response_model=SourceOut, dependencies=ADMIN)
async def change(source_id: str, body: SourceChange, conn: Conn) -> dict[str, Any]:
    source = await credentials.update_source(conn, source_id, body.model_dump(exclude_none=True))
    if source is None:
        raise HTTPException(404, f"no source {source_id!r}")
    return source
