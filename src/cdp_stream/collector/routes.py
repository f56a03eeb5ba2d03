"""The Segment HTTP Tracking API: ``POST /v1/{identify,track,page,screen,group,alias,batch}``.

A request goes: bounded read -> gunzip (bounded) -> strict JSON -> write key -> origin
(``cors``) -> per-event validation and enrichment (``intake``) -> publish accepted events
to ``cdp.events`` and rejected ones to ``cdp.events.rejected`` -> answer. The body is read
as JSON whatever its Content-Type says: browsers send ``text/plain`` to avoid a preflight.

When the client gets its 200: only after the broker acknowledged every record of the
request, accepted and rejected alike. If the broker cannot acknowledge in time the answer
is 503 with Retry-After and the client must send again (redelivered copies are harmless:
the resolver dedupes by messageId, which is fixed per event before publishing).
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cdp_stream.bus.base import Bus, BusUnavailable, Record
from cdp_stream.collector._json import BadRequest, loads_strict
from cdp_stream.collector.auth import Sources, basic_username
from cdp_stream.collector.cors import PREFLIGHT_HEADERS, cors_headers, origin_allowed
from cdp_stream.collector.intake import IntakeResult, body_write_key, intake
from cdp_stream.settings import Settings

router = APIRouter(tags=["collector"])

ENDPOINTS = ("identify", "track", "page", "screen", "group", "alias", "batch")


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": False, "error": message, **extra}, status_code=status)


def bus_unavailable(exc: BusUnavailable, settings: Settings) -> JSONResponse:
    """503 + Retry-After: nothing of the request was accepted, send it again."""
    return JSONResponse(
        {"success": False, "error": f"event bus unavailable, nothing accepted: {exc}"},
        status_code=503,
        headers={"Retry-After": str(settings.retry_after_s)},
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, decompressed, refusing (413) anything over ``limit`` bytes either way."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body over the {limit}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise BadRequest(415, f"unsupported Content-Encoding {encoding!r}; use gzip")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(400, f"invalid gzip body: {exc}") from exc
    if len(out) > limit:
        raise BadRequest(413, f"decompressed request body over the {limit}-byte limit")
    if not inflater.eof:
        raise BadRequest(400, "truncated gzip body")
    return out


async def _collect(request: Request, endpoint: str) -> JSONResponse:
    state = request.app.state
    settings: Settings = state.settings
    sources: Sources = state.sources
    origin = request.headers.get("origin")
    received_at = datetime.now(UTC)
    try:
        body = loads_strict(
            await read_body(request, settings.max_request_bytes), settings.max_json_depth
        )
        key = basic_username(request.headers.get("authorization")) or body_write_key(body)
        source = await sources.by_write_key(key) if key else None
        if source is None:
            return error_response(401, "missing or unknown write key")
        if origin is not None and not origin_allowed(origin, source.allowed_origins):
            return error_response(403, f"origin {origin!r} may not send to this source")
        result = intake(
            body,
            endpoint,
            settings=settings,
            rules=request.app.state.rules,
            source_id=source.id,
            received_at=received_at,
            ip=request.client.host if request.client else None,
            user_agent=request.headers.get("user-agent"),
        )
    except BadRequest as exc:
        return error_response(exc.status, exc.message)
    response = await _publish(state.bus, settings, source.id, endpoint, result)
    if origin is not None:  # judged above: this page may read the answer
        response.headers.update(cors_headers(origin))
    return response


async def _publish(
    bus: Bus, settings: Settings, source_id: str, endpoint: str, result: IntakeResult
) -> JSONResponse:
    records = [Record(settings.topics.events, a.key, a.value) for a in result.accepted]
    records += [
        Record(settings.topics.rejected, source_id.encode(), r.record)
        for r in result.rejected
        if r.record is not None  # an oversize event is refused, never published
    ]
    try:
        await bus.publish_many(records)
    except BusUnavailable as exc:
        return bus_unavailable(exc, settings)
    rejected = [
        {"index": r.index, "messageId": r.message_id, "reason": r.reason} for r in result.rejected
    ]
    if endpoint != "batch" and result.rejected:
        return error_response(400, result.rejected[0].reason, rejected=rejected)
    return JSONResponse({"success": True, **({"rejected": rejected} if rejected else {})})


async def preflight(request: Request) -> Response:
    """A CORS preflight: allowed when some source lists the origin (see ``cors``)."""
    origin = request.headers.get("origin")
    sources: Sources = request.app.state.sources
    if origin is None or not await sources.any_allows(origin):
        return Response(status_code=403)
    return Response(status_code=204, headers={**cors_headers(origin), **PREFLIGHT_HEADERS})


def _route(endpoint: str) -> Any:
    async def handler(request: Request) -> JSONResponse:
        return await _collect(request, endpoint)

    handler.__name__ = f"collect_{endpoint}"
    return handler


for _endpoint in ENDPOINTS:
    router.add_api_route(f"/v1/{_endpoint}", _route(_endpoint), methods=["POST"])
    router.add_api_route(
        f"/v1/{_endpoint}", preflight, methods=["OPTIONS"], include_in_schema=False
    )
