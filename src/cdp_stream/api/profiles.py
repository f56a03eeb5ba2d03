"""``/v1/profiles``: one profile per person, found by profile id or by any identifier.

``ref`` is a profile id (a merged-away one lands on its canonical profile) or
``type:value`` with the value normalized as on ingestion (``email:Ada@Example.com`` finds
``ada@example.com``).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream import metrics
from cdp_stream.api.deps import Conn, cursor_at, in_utc, position
from cdp_stream.bus.base import BusUnavailable
from cdp_stream.openapi import bearer
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import read_only
from cdp_stream.resolver.consumer import relay_outbox
from cdp_stream.resolver.identity import IdentityRules
from cdp_stream.resolver.unmerge import unmerge_last
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/profiles", tags=["profiles"])
READ = bearer("profiles:read", 400, 404, 422)


class IdentityOut(BaseModel):
    type: str
    value: str


class ProfileOut(BaseModel):
    id: str
    identities: list[IdentityOut]
    traits: dict[str, Any]
    computed: dict[str, Any]
    merged_from: list[str]
    created_at: datetime
    updated_at: datetime


async def resolve_ref(request: Request, conn: Conn, ref: str) -> uuid.UUID:
    """A profile id or ``type:value`` -> the canonical profile id, or 404."""
    try:
        found = await repo.canonical_id(conn, uuid.UUID(ref))
    except ValueError:
        rules: IdentityRules = request.app.state.rules
        ident = rules.parse_ref(ref)
        found = None if ident is None else await repo.profile_for_identifier(conn, ident)
    if found is None:
        raise HTTPException(404, f"no profile for {ref!r}")
    return found


Profile = Annotated[uuid.UUID, Depends(resolve_ref)]


# The hot path of the API (lookups by identifier): one statement, on a pooled connection
# outside a transaction, and the answer encoded once by orjson (the JSON ``ProfileOut``
# gives). No docstring: it would become the route's description in the OpenAPI document.
@router.get("/{ref}", response_model=ProfileOut, **READ)
async def get_profile(request: Request, ref: str) -> Response:
    rules: IdentityRules = request.app.state.rules

    async def lookup(conn: AsyncConnection) -> dict[str, Any] | None:
        try:
            profile_id = uuid.UUID(ref)
        except ValueError:
            ident = rules.parse_ref(ref)
            return None if ident is None else await repo.read_profile_of(conn, ident)
        found = await repo.canonical_id(conn, profile_id)
        return None if found is None else await repo.read_profile(conn, found)

    profile = await read_only(request.app.state.lookups, lookup)
    if profile is None:
        raise HTTPException(404, f"no profile for {ref!r}")
    return Response(orjson.dumps(profile, option=orjson.OPT_UTC_Z), media_type="application/json")


class EventOut(BaseModel):
    message_id: str
    source_id: str
    type: str
    event: str | None
    channel: str
    timestamp: datetime
    received_at: datetime
    payload: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventOut]
    next: str | None


@router.get("/{ref}/events", response_model=EventPage, **READ)
async def get_events(
    profile_id: Profile,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
    type: str | None = None,
    channel: str | None = None,
    since: datetime | None = None,
) -> dict[str, Any]:
    """The profile's timeline, newest first, ``limit`` at a time; ``next`` pages on."""
    try:
        since = since and in_utc(since)
    except OverflowError as exc:
        raise HTTPException(422, "since: out of range") from exc
    rows = await repo.read_events(
        conn,
        profile_id,
        limit=limit + 1,
        before=position(cursor) if cursor else None,
        type_=type,
        channel=channel,
        since=since,
    )
    page = rows[:limit]
    more = len(rows) > limit
    return {
        "items": [r.item for r in page],
        "next": cursor_at(page[-1].timestamp, page[-1].id) if more else None,
    }


class IdentityDetail(IdentityOut):
    created_at: datetime


@router.get("/{ref}/identities", response_model=list[IdentityDetail], **READ)
async def get_identities(profile_id: Profile, conn: Conn) -> list[dict[str, Any]]:
    return await repo.read_identities(conn, profile_id)


class MergeOut(BaseModel):
    id: int
    canonical_id: str
    merged_id: str
    source_id: str | None
    message_id: str | None
    created_at: datetime
    undone_at: datetime | None


class RefusalOut(BaseModel):
    type: str
    value: str
    other_profile_id: str | None
    reason: str
    source_id: str
    message_id: str
    created_at: datetime


class MergesOut(BaseModel):
    merges: list[MergeOut]
    refusals: list[RefusalOut]


@router.get("/{ref}/merges", response_model=MergesOut, **READ)
async def get_merges(profile_id: Profile, conn: Conn) -> dict[str, Any]:
    """The merges that built this profile (undone ones too) and the links it refused."""
    return await repo.read_merges(conn, profile_id)


class UnmergeOut(BaseModel):
    undone_merge: int
    profile: ProfileOut
    restored: ProfileOut


@router.post(
    "/{ref}/unmerge",
    response_model=UnmergeOut,
    **bearer("profiles:write", 400, 404, 409, 422),
)
async def post_unmerge(profile_id: Profile, conn: Conn) -> dict[str, Any]:
    """Reverse the profile's last merge (see :mod:`cdp_stream.resolver.unmerge`)."""
    done = await unmerge_last(conn, profile_id)
    if done is None:
        raise HTTPException(409, "this profile has no merge to undo")
    metrics.profile_unmerges.inc()
    return {
        "undone_merge": done.merge_id,
        "profile": await repo.read_profile(conn, done.kept),
        "restored": await repo.read_profile(conn, done.restored),
    }


@router.delete("/{ref}", status_code=204, **bearer("profiles:delete", 400, 404, 422))
async def delete_profile(request: Request, profile_id: Profile) -> None:
    """Erase the person everywhere (a data-rights request); see ``repo.delete_group``.

    Their identifiers go to the suppression list, so late events are refused instead of
    re-creating them, and a tombstone ``{"type": "deleted", "profile_id", "merged_ids"}``
    goes to ``cdp.profile-updates`` through the outbox, so every consumer forgets them.
    """
    state = request.app.state
    async with state.engine.begin() as conn:
        ids = await repo.delete_group(conn, profile_id, state.rules.suppression)
        merged = [str(i) for i in ids if i != profile_id]
        tombstone = ProfileUpdate(type="deleted", profile_id=str(profile_id), merged_ids=merged)
        await repo.insert_outbox(conn, [repo.Update(str(profile_id), tombstone.payload())])
    try:
        await relay_outbox(state.engine, state.bus, state.settings.topics.profile_updates)
    except BusUnavailable:  # the row stays in the outbox: the resolver relays it later
        log.warning("tombstone for %s left in the outbox: the bus is unavailable", profile_id)
