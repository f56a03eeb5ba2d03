"""``/v1/profiles``: one profile per person, found by profile id or by any identifier.

``ref`` is a profile id (a merged-away one lands on its canonical profile) or
``type:value`` with the value normalized as on ingestion (``email:Ada@Example.com`` finds
``ada@example.com``). Beside the profile, its timeline, identities and merges: what the
console shows of a person (traits with when and by which source each was set, the
identity graph, consent), and ``GET /v1/profiles?starts_with=email:ad`` for type-ahead.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from cdp_stream import metrics
from cdp_stream.activation import audiences, dmp
from cdp_stream.api.deps import Conn, bearer, cursor_at, database_error, in_utc, position, refusal
from cdp_stream.bus.base import BusUnavailable
from cdp_stream.identity import IdentityRules
from cdp_stream.profiles import reads, repository
from cdp_stream.profiles.db import DATABASE_UNAVAILABLE, read_only
from cdp_stream.profiles.erasure import erase
from cdp_stream.resolver.consumer import relay_outbox
from cdp_stream.resolver.repository import remove_splits
from cdp_stream.resolver.unmerge import unmerge_last

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/profiles", tags=["profiles"])
LOOKUP_SCOPE = "profiles:read"
READ = bearer(LOOKUP_SCOPE, 400, 404, 422)


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
        found = await repository.canonical_id(conn, uuid.UUID(ref))
    except ValueError:
        rules: IdentityRules = request.app.state.rules
        ident = rules.parse_ref(ref)
        found = None if ident is None else await repository.profile_for_identifier(conn, ident)
    if found is None:
        raise HTTPException(404, f"no profile for {ref!r}")
    return found


Profile = Annotated[uuid.UUID, Depends(resolve_ref)]


# The hot path of the API (lookups by identifier). A GET is answered by ``lookup_endpoint``,
# a plain ASGI app the app serves before FastAPI's middleware, routing and dependency
# solving (``benchmarks/lookup.py``: they cost more API CPU than the lookup itself); this
# route declares the operation in the OpenAPI document and gives the same answer. No
# docstring: it would become the route's description there.
@router.get("/{ref}", response_model=ProfileOut, **READ)
async def get_profile(request: Request, ref: str) -> Response:
    return await _lookup(request, ref)


async def _lookup(request: Request, ref: str) -> Response:
    """One statement, on a pooled connection outside a transaction, and the answer
    encoded once by orjson (the JSON ``ProfileOut`` gives)."""
    rules: IdentityRules = request.app.state.rules

    async def lookup(conn: AsyncConnection) -> reads.ProfileRow | None:
        try:
            profile_id = uuid.UUID(ref)
        except ValueError:
            ident = rules.parse_ref(ref)
            return None if ident is None else await reads.read_profile_of(conn, ident)
        found = await repository.canonical_id(conn, profile_id)
        return None if found is None else await reads.read_profile(conn, found)

    profile = await read_only(request.app.state.lookups, lookup)
    if profile is None:
        raise HTTPException(404, f"no profile for {ref!r}")
    return Response(orjson.dumps(profile, option=orjson.OPT_UTC_Z), media_type="application/json")


async def lookup_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /v1/profiles/{ref}`` as a plain ASGI app: the token check, the database's
    errors and the refusals answered as the FastAPI route would."""
    request = Request(scope, receive)
    state = request.app.state
    try:
        refused = await refusal(state.tokens, request.headers.get("authorization"), LOOKUP_SCOPE)
        if refused is not None:
            raise refused
        response = await _lookup(request, scope["path"].rpartition("/")[2])
    except HTTPException as exc:
        response = JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)
    except DATABASE_UNAVAILABLE as exc:
        response = database_error(exc, state.settings, "GET /v1/profiles/{ref}")
    await response(scope, receive, send)


# prefix -> (route template, endpoint): the app serves a GET of ``prefix/{ref}`` here.
LOOKUP_PATHS: dict[str, tuple[str, ASGIApp]] = {
    "/v1/profiles": ("/v1/profiles/{ref}", lookup_endpoint)
}


class IdentifierMatch(IdentityOut):
    profile_id: str


@router.get("", response_model=list[IdentifierMatch], **bearer("profiles:read", 400, 422))
async def search(
    request: Request,
    conn: Conn,
    starts_with: Annotated[str, Query(min_length=3, description="type:prefix, e.g. email:ad")],
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> list[reads.IdentifierMatch]:
    """Identifiers of one type starting with a prefix (the console's type-ahead), in value
    order; the prefix is normalized as the type's values are (lower-case for emails)."""
    type_, _, prefix = starts_with.partition(":")
    type_ = type_.strip().lower()
    if not prefix or not type_:
        raise HTTPException(422, "starts_with: type:prefix, e.g. email:ad")
    rules: IdentityRules = request.app.state.rules
    # Normalizing a prefix as a whole value works for the types whose normalization is
    # per character (trimming, lower-case); others (phone numbers) are matched as typed.
    normal = rules.normalize(type_, prefix) if type_ != "phone" else prefix.strip()
    if not normal:
        return []
    return await reads.search_identifiers(conn, type_, normal, limit)


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
    rows = await reads.read_events(
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
async def get_identities(profile_id: Profile, conn: Conn) -> list[reads.IdentityRow]:
    return await reads.read_identities(conn, profile_id)


class MembershipOut(BaseModel):
    id: str
    name: str
    entered_at: datetime


@router.get("/{ref}/audiences", response_model=list[MembershipOut], **READ)
async def get_audiences(profile_id: Profile, conn: Conn) -> list[dict[str, Any]]:
    """The audiences the profile is in now, by name, with when it entered each."""
    return await audiences.audiences_of(conn, profile_id)


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


class SplitOut(BaseModel):
    profile_id: str = Field(description="this group's profile the split names")
    other_id: str = Field(description="the profile it is split from")
    other_canonical_id: str = Field(description="the canonical profile holding other_id now")
    merge_id: int | None = Field(description="the merge whose undoing made the split")
    created_at: datetime


class MergesOut(BaseModel):
    merges: list[MergeOut]
    refusals: list[RefusalOut]
    splits: list[SplitOut]


@router.get("/{ref}/merges", response_model=MergesOut, **READ)
async def get_merges(profile_id: Profile, conn: Conn) -> reads.Merges:
    """The merges that built this profile (undone ones too), the links it refused, and
    the splits that keep it apart from other profiles."""
    return await reads.read_merges(conn, profile_id)


class TraitOut(BaseModel):
    name: str
    value: Any
    set_at: datetime = Field(description="the timestamp of the event that set it")
    set_once: bool = Field(description="from context.traits_set_once: the oldest value wins")
    source_id: str | None = Field(description="the source of that event (null: not found)")


@router.get("/{ref}/traits", response_model=list[TraitOut], **READ)
async def get_traits(profile_id: Profile, conn: Conn) -> list[reads.TraitSource]:
    """Each trait with when it was last set and by which source."""
    return await reads.read_trait_sources(conn, profile_id)


class Atom(BaseModel):
    id: str = Field(description="a profile of the group (the canonical one first)")
    created_at: datetime
    identities: list[IdentityDetail] = Field(description="the identifiers it claimed first")


class GraphOut(MergesOut):
    canonical_id: str
    atoms: list[Atom]


@router.get("/{ref}/graph", response_model=GraphOut, **READ)
async def get_graph(profile_id: Profile, conn: Conn) -> reads.Graph:
    """The identity graph: the profiles merged into this one with the identifiers each
    brought, the merges that joined them, and the links refused."""
    return await reads.read_identity_graph(conn, profile_id)


class ConsentOut(BaseModel):
    trait: Any = Field(description="the profile's `consent` trait (null: none)")
    context: Any = Field(description="`context.consent` of its latest event carrying one")
    context_at: datetime | None
    opted_out: bool = Field(description="refused marketing or advertising: left out of the DMP")


@router.get("/{ref}/consent", response_model=ConsentOut, **READ)
async def get_consent(profile_id: Profile, conn: Conn) -> dict[str, Any]:
    """The person's consent choices, and whether the DMP feed leaves them out."""
    profile = await reads.read_profile(conn, profile_id)
    trait = None if profile is None else profile.traits.get("consent")
    latest = await reads.latest_consent(conn, profile_id)
    context, at = (None, None) if latest is None else latest
    facts = dmp.Facts(traits={"consent": trait}, context={"consent": context})
    return {
        "trait": trait,
        "context": context,
        "context_at": at,
        "opted_out": dmp.opted_out(facts),
    }


class UnmergeOut(BaseModel):
    undone_merge: int
    profile: ProfileOut
    restored: ProfileOut


@router.post(
    "/{ref}/unmerge",
    response_model=UnmergeOut,
    **bearer("profiles:write", 400, 404, 409, 422),
)
async def post_unmerge(request: Request, profile_id: Profile) -> dict[str, Any]:
    """Reverse the profile's last merge and split the two profiles for good (see
    :mod:`cdp_stream.resolver.unmerge`); their two updates go out at once."""
    async with request.app.state.engine.begin() as conn:  # committed before the relay
        done = await unmerge_last(conn, profile_id)
        if done is None:
            raise HTTPException(409, "this profile has no merge to undo")
        metrics.profile_unmerges.inc()
        answer = {
            "undone_merge": done.merge_id,
            "profile": await reads.read_profile(conn, done.kept),
            "restored": await reads.read_profile(conn, done.restored),
        }
    await _publish(request, done.outbox_ids, f"the unmerge of {profile_id}")
    return answer


@router.delete("/{ref}/splits/{other}", status_code=204, **bearer("profiles:write", 400, 404, 422))
async def delete_split(request: Request, profile_id: Profile, other: str, conn: Conn) -> None:
    """Remove the split an unmerge recorded between the two profiles' groups: a later
    event that links them merges them again. 404 when they are not split."""
    other_id = await resolve_ref(request, conn, other)
    if not await remove_splits(conn, profile_id, other_id):
        raise HTTPException(404, f"{profile_id} and {other_id} are not split")


@router.delete("/{ref}", status_code=204, **bearer("profiles:delete", 400, 404, 422))
async def delete_profile(request: Request, profile_id: Profile) -> None:
    """Erase the person everywhere (a data-rights request): :mod:`cdp_stream.profiles.erasure`.

    Their identifiers go to the suppression list, so late events are refused instead of
    re-creating them, and a tombstone ``{"type": "deleted", "profile_id", "merged_ids"}``
    goes to ``cdp.profile-updates`` through the outbox, so every consumer forgets them.
    """
    state = request.app.state
    async with state.engine.begin() as conn:
        erased = await erase(conn, profile_id, state.rules.suppression)
    await _publish(request, erased.outbox_ids, f"the tombstone of {profile_id}")


async def _publish(request: Request, ids: list[int], what: str) -> None:
    """Publish the updates this request just committed to the outbox (``ids``) now, not
    at the next batch a resolver happens to apply; every other row is the resolvers' to
    relay."""
    state = request.app.state
    topic = state.settings.topics.profile_updates
    try:
        await relay_outbox(state.engine, state.bus, topic, ids=ids)
    except BusUnavailable:  # the rows stay in the outbox: the resolvers relay them later
        log.warning("profile updates of %s left in the outbox: the bus is unavailable", what)
