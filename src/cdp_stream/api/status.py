"""``GET /v1/status``: the flow at a glance, for the console's health page.

Read from what the database already knows (so whichever process serves it, every
process's work counts): events stored in the last hour, events the collector rejected in
the last hour and consumer lag (from the Postgres bus's log; null with Kafka, whose
broker holds them), and the dead letters with their reasons.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from cdp_stream.api.deps import Conn, bearer
from cdp_stream.profiles import dead_letters, health, reads
from cdp_stream.settings import Settings

router = APIRouter(prefix="/v1", tags=["status"])
_LISTED = 20


class Rejection(BaseModel):
    receivedAt: str | None
    sourceId: str | None
    messageId: str | None
    reason: str | None


class DeadLetter(BaseModel):
    id: int
    consumer: str
    origin: str
    reason: str
    created_at: datetime


class Lag(BaseModel):
    group: str
    topic: str
    lag: int = Field(description="records published and not yet committed by the group")


class StatusOut(BaseModel):
    since: datetime = Field(description="an hour ago: the start of the counts below")
    accepted_last_hour: int = Field(description="events stored, received since `since`")
    rejected_last_hour: int | None = Field(description="null: not known here (Kafka)")
    rejections: list[Rejection] | None = Field(description=f"the newest {_LISTED}")
    dead_letters: dict[str, int] = Field(description="records parked, per consumer")
    recent_dead_letters: list[DeadLetter] = Field(description=f"the newest {_LISTED}")
    lag: list[Lag] | None = Field(description="null: not known here (Kafka)")


@router.get("/status", response_model=StatusOut, **bearer("profiles:read"))
async def get_status(request: Request, conn: Conn) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    since = datetime.now(UTC) - timedelta(hours=1)
    rejected, lag = None, None
    if settings.postgres_bus:  # else Kafka holds them
        topic = settings.topics.rejected
        rejected = await health.rejections_since(conn, topic, since, _LISTED)
        lag = await health.consumer_lag(conn, settings.topic_namespace)
    return {
        "since": since,
        "accepted_last_hour": await reads.events_received_since(conn, since),
        "rejected_last_hour": None if rejected is None else rejected[0],
        "rejections": None if rejected is None else rejected[1],
        "dead_letters": await dead_letters.counts(conn),
        "recent_dead_letters": await health.recent_dead_letters(conn, _LISTED),
        "lag": lag,
    }
