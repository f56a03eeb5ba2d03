"""``/v1/sources``: where events come from. Create one to get a write key; list the web
origins whose pages may use it (the collector answers their CORS requests and refuses
the others, see ``collector/cors.py``); set its rate limit (events per second and burst,
see ``collector/ratelimit.py``; null: the collector's default). Admin scope: this decides
who may write events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from cdp_stream.api.deps import Conn, bearer
from cdp_stream.origins import origin_pattern
from cdp_stream.profiles import credentials

router = APIRouter(prefix="/v1/sources", tags=["sources"])

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Origins = Annotated[
    list[Annotated[str, AfterValidator(origin_pattern)]],
    AfterValidator(lambda patterns: sorted(set(patterns))),  # stored normalized, once each
]

Rate = Annotated[
    float | None,
    Field(gt=0, le=1e9, description="events per second per collector process; null: default"),
]
Burst = Annotated[
    int | None,
    Field(ge=1, le=2**31 - 1, description="events at once above the rate; null: default"),
]


class SourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    allowed_origins: Origins = []
    rate_limit_per_s: Rate = None
    rate_limit_burst: Burst = None


class SourceChange(BaseModel):
    """The fields to change; a rate limit set to null goes back to the default."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    allowed_origins: Origins | None = None
    rate_limit_per_s: Rate = None
    rate_limit_burst: Burst = None


class SourceOut(BaseModel):
    id: str
    name: str
    write_key: str
    allowed_origins: list[str]
    rate_limit_per_s: float | None
    rate_limit_burst: int | None
    created_at: datetime


@router.get("", response_model=list[SourceOut], **bearer("admin"))
async def list_all(conn: Conn) -> list[credentials.SourceRow]:
    return await credentials.list_sources(conn)


@router.post("", status_code=201, response_model=SourceOut, **bearer("admin", 400, 422))
async def create(body: SourceIn, conn: Conn) -> credentials.SourceRow | None:
    limits = body.model_dump(include={"rate_limit_per_s", "rate_limit_burst"}, exclude_none=True)
    source_id = await credentials.create_source(conn, body.name, body.allowed_origins, **limits)
    return await credentials.read_source(conn, source_id)


@router.patch("/{source_id}", response_model=SourceOut, **bearer("admin", 400, 404, 422))
async def change(source_id: str, body: SourceChange, conn: Conn) -> credentials.SourceRow:
    changes = {
        field: value
        for field, value in body.model_dump(exclude_unset=True).items()
        if value is not None or field.startswith("rate_limit_")  # a limit may be reset
    }
    source = await credentials.update_source(conn, source_id, changes)
    if source is None:
        raise HTTPException(404, f"no source {source_id!r}")
    return source
