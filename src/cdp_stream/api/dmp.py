"""``/v1/dmp/audience-counts``: the anonymized audience counts, as published to the DMP;
``/v1/dmp/anonymization``: the k, epsilon and bucket vocabularies they were made with.

It serves the ``dmp_audience_counts`` rows, which hold only what the feed publishes
(see :mod:`cdp_stream.activation.dmp`): counts already suppressed and noised, never a
profile. Newest window first, at most ``limit`` rows; ``since`` keeps windows starting at
or after it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from cdp_stream.activation import audiences, dmp
from cdp_stream.api.deps import Conn, bearer
from cdp_stream.settings import Settings

router = APIRouter(prefix="/v1/dmp", tags=["dmp"])
READ = bearer("profiles:read", 400, 404, 422)


class AudienceCountOut(BaseModel):
    audience_id: uuid.UUID
    window: str
    window_start: datetime
    dimension: str
    bucket: str
    count: int
    epsilon: float | None


class AudienceCountsOut(BaseModel):
    items: list[AudienceCountOut]


@router.get("/audience-counts", response_model=AudienceCountsOut, **READ)
async def get_audience_counts(
    conn: Conn,
    audience: uuid.UUID | None = None,
    window: Literal["hour", "day"] | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Counts of one audience (404 if it does not exist) or of all."""
    try:
        since = since and (since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC))
    except OverflowError as exc:  # before year 1 once in UTC: Postgres cannot compare it
        raise HTTPException(422, "since: out of range") from exc
    if audience is not None and not await audiences.audience_exists(conn, audience):
        raise HTTPException(404, f"no audience {audience}")
    items = await dmp.read_counts(
        conn, audience_id=audience, window=window, since=since, limit=limit
    )
    return {"items": items}


class AnonymizationOut(BaseModel):
    k: int = Field(description="buckets (and audiences) under k profiles are not published")
    epsilon: float | None = Field(description="the Laplace noise's epsilon; null: exact counts")
    windows: list[str]
    dimensions: dict[str, list[str]] = Field(
        description="each dimension's fixed vocabulary of buckets: a bucket of it missing "
        "from a window's counts was suppressed"
    )


@router.get("/anonymization", response_model=AnonymizationOut, **bearer("profiles:read"))
async def get_anonymization(request: Request) -> dict[str, Any]:
    """How the counts are anonymized (this process's settings), so a reader can tell a
    suppressed bucket (absent) from a small one, and knows the noise."""
    settings: Settings = request.app.state.settings
    return {
        "k": settings.dmp_k,
        "epsilon": settings.dmp_epsilon,
        "windows": settings.dmp_windows,
        "dimensions": {d: sorted(dmp.DIMENSIONS[d][1]) for d in settings.dmp_dimensions},
    }
