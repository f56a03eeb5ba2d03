"""The Segment HTTP Tracking API: ``POST /v1/{identify,track,page,screen,group,alias,batch}``.

The same endpoints answer the paths the web libraries sites already run post to:
Segment's analytics.js 2.0 the first letter of the call under its ``apiHost``
(``/v1/t``, ``/v1/p``, ``/v1/i``, ``/v1/g``, ``/v1/a``, ``/v1/s``; ``/v1/b`` a batch), and
RudderStack's SDK v3 in beacon mode ``/beacon/v1/batch?writeKey=<key>`` (a beacon can
carry no header, so the key is in the query string). What they fetch before sending is
in ``dropin``.

A request goes: bounded read -> gunzip (bounded) -> strict JSON -> write key -> origin
(``cors``) -> rate limit (``ratelimit``: 429 + Retry-After) -> per-event validation and
enrichment (``intake``) -> publish accepted events to ``cdp.events`` and rejected ones to
``cdp.events.rejected`` -> answer. The body is read as JSON whatever its Content-Type
says: browsers send ``text/plain`` to avoid a preflight.

When the client gets its 200: only after the broker acknowledged every record of the
request, accepted and rejected alike. If the broker cannot acknowledge in time the answer
is 503 with Retry-After and the client must send again (redelivered copies are harmless:
the resolver dedupes by messageId, which is fixed per event before publishing). A database
that cannot say whose write key it is (only for a key not yet in memory, see ``auth``) is
also a 503 with Retry-After.

Why plain ASGI endpoints, not FastAPI routes: these are the hot path, and FastAPI's
per-request machinery (its middleware, router and dependency solving) cost more CPU than
the endpoint itself (``benchmarks/collect.py``, profiled with py-spy). For the same reason
a POST reads its headers and body straight from the ASGI scope and messages, not through
Starlette's ``Request`` (whose header lookups each decode and scan every header), and a
plain success is answered with bytes encoded once: a quarter of the endpoint's CPU per
single-event request, measured in one process. The app dispatches
:data:`TRACKING_PATHS` here before its routing (``cdp_stream.app``); :func:`openapi_paths`
documents them in the app's OpenAPI document.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cdp_stream import metrics
from cdp_stream.bus.base import Bus, BusUnavailable, Record
from cdp_stream.collector._json import BadRequest, loads_strict
from cdp_stream.collector.auth import Sources, basic_username
from cdp_stream.collector.cors import PREFLIGHT_HEADERS, cors_headers, origin_allowed
from cdp_stream.collector.intake import IntakeResult, body_write_key, intake
from cdp_stream.collector.ratelimit import RateLimits
from cdp_stream.events import MODELS, Batch
from cdp_stream.openapi import Accepted, Error, responses
from cdp_stream.profiles.db import DATABASE_UNAVAILABLE
from cdp_stream.settings import Settings

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


def database_unavailable(settings: Settings) -> JSONResponse:
    """503 + Retry-After: Postgres is down or too slow (its pool timed out), try again."""
    return JSONResponse(
        {"success": False, "error": "database unavailable, try again"},
        status_code=503,
        headers={"Retry-After": str(settings.retry_after_s)},
    )


def raw_headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by lower-case name, the first of repeated ones (as Starlette's
    ``Headers.get`` answers): one pass over the scope, where each ``Headers.get`` decodes
    and scans them all again (the tracking endpoints read six)."""
    return dict(reversed(scope["headers"]))


async def read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    """The body, decompressed, refusing (413) anything over ``limit`` bytes either way."""
    declared = headers.get(b"content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body over the {limit}-byte limit")
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
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


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _collect(scope: Scope, receive: Receive, endpoint: str, key_in_query: bool) -> Response:
    state = scope["app"].state
    settings: Settings = state.settings
    sources: Sources = state.sources
    headers = raw_headers(scope)
    origin = _text(headers.get(b"origin"))
    received_at = datetime.now(UTC)
    try:
        body = loads_strict(
            await read_body(receive, headers, settings.max_request_bytes),
            settings.max_json_depth,
        )
        key = basic_username(_text(headers.get(b"authorization"))) or body_write_key(body)
        if key is None and key_in_query:
            key = Request(scope).query_params.get("writeKey")
        source = await sources.by_write_key(key) if key else None
        if source is None:
            return error_response(401, "missing or unknown write key")
        if origin is not None and not origin_allowed(origin, source.allowed_origins):
            return error_response(403, f"origin {origin!r} may not send to this source")
        limits: RateLimits = state.rate_limits
        wait = limits.take(source, _events_in(body, endpoint))
        result = None
        if not wait:
            result = intake(
                body,
                endpoint,
                settings=settings,
                rules=state.rules,
                source_id=source.id,
                received_at=received_at,
                ip=client[0] if (client := scope.get("client")) else None,
                user_agent=_text(headers.get(b"user-agent")),
            )
    except BadRequest as exc:
        return error_response(exc.status, exc.message)
    except DATABASE_UNAVAILABLE:
        return database_unavailable(settings)
    response: Response
    if result is None:  # nothing published: the client sends it again after Retry-After
        metrics.events_rejected.labels("collector", source.id, "rate_limited").inc(
            _events_in(body, endpoint)
        )
        response = error_response(429, "rate limit of this write key exceeded, retry later")
        response.headers["Retry-After"] = str(wait)
    else:
        response = await _publish(state.bus, settings, source.id, endpoint, result)
    if origin is not None:  # judged above: this page may read the answer
        response.headers.update(cors_headers(origin))
    return response


def _events_in(body: Any, endpoint: str) -> int:
    """What a request costs in rate-limit tokens: its events (a batch's items)."""
    if endpoint == "batch" and isinstance(body, dict) and isinstance(body.get("batch"), list):
        return max(1, len(body["batch"]))
    return 1


# The hot path's metric children, looked up once (a lookup costs as much as the count).
_PRODUCE = metrics.produce_duration.labels("collector")
_ACCEPTED: dict[str, Any] = {}
# Most answers: encoded once, not by the stdlib's json at each request.
_SUCCESS = orjson.dumps({"success": True})


async def _publish(
    bus: Bus, settings: Settings, source_id: str, endpoint: str, result: IntakeResult
) -> Response:
    topics = settings.topics  # a property: built once here, not once per record
    events = topics.events
    records = [Record(events, a.key, a.value) for a in result.accepted]
    records += [
        Record(topics.rejected, source_id.encode(), r.record)
        for r in result.rejected
        if r.record is not None  # an oversize event is refused, never published
    ]
    started = time.perf_counter()
    try:
        await bus.publish_many(records)
    except BusUnavailable as exc:
        metrics.produce_failures.labels("collector").inc()
        return bus_unavailable(exc, settings)
    _PRODUCE.observe(time.perf_counter() - started)
    if result.accepted:
        if (accepted := _ACCEPTED.get(source_id)) is None:
            accepted = _ACCEPTED[source_id] = metrics.events_accepted.labels(source_id)
        accepted.inc(len(result.accepted))
    for r in result.rejected:  # no published record: refused for its size alone
        why = "invalid" if r.record is not None else "too_large"
        metrics.events_rejected.labels("collector", source_id, why).inc()
    rejected = [
        {"index": r.index, "messageId": r.message_id, "reason": r.reason} for r in result.rejected
    ]
    if endpoint != "batch" and result.rejected:
        return error_response(400, result.rejected[0].reason, rejected=rejected)
    if rejected:
        return JSONResponse({"success": True, "rejected": rejected})
    return Response(_SUCCESS, media_type="application/json")


async def preflight(request: Request) -> Response:
    """A CORS preflight: allowed when some source lists the origin (see ``cors``)."""
    origin = request.headers.get("origin")
    sources: Sources = request.app.state.sources
    try:
        allowed = origin is not None and await sources.any_allows(origin)
    except DATABASE_UNAVAILABLE:
        return database_unavailable(request.app.state.settings)
    if origin is None or not allowed:
        return Response(status_code=403)
    return Response(status_code=204, headers={**cors_headers(origin), **PREFLIGHT_HEADERS})


_ALLOW = "OPTIONS, POST"


def _endpoint(name: str, key_in_query: bool = False) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "POST":
            response = await _collect(scope, receive, name, key_in_query)
        elif method == "OPTIONS":
            response = await preflight(Request(scope, receive))
        else:
            response = error_response(405, "method not allowed: use POST")
            response.headers["Allow"] = _ALLOW
        await response(scope, receive, send)

    app.__name__ = f"collect_{name}"
    return app


def _tracking_paths() -> dict[str, ASGIApp]:
    """Each endpoint's paths (see the module docstring), with a trailing slash too, which
    FastAPI's routing used to redirect."""
    paths: dict[str, ASGIApp] = {}
    for name in ENDPOINTS:
        endpoint = _endpoint(name)
        for path in (f"/v1/{name}", f"/v1/{name[0]}"):
            paths[path] = paths[f"{path}/"] = endpoint
    beacon = _endpoint("batch", key_in_query=True)
    paths["/beacon/v1/batch"] = paths["/beacon/v1/batch/"] = beacon
    return paths


# path -> plain ASGI endpoint; the app serves these before its own routing.
TRACKING_PATHS = _tracking_paths()


def openapi_paths() -> tuple[dict[str, Any], dict[str, Any]]:
    """The tracking endpoints in OpenAPI (they are not FastAPI routes): their paths, and
    the component schemas of their bodies (the event models, the answers)."""
    bodies: list[tuple[str, type[BaseModel]]] = [*MODELS.items(), ("batch", Batch)]
    refs, top = models_json_schema(
        [
            *((model, "validation") for _, model in bodies),
            (Accepted, "serialization"),
            (Error, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    ok = {
        "description": "every event was accepted (a batch lists the ones it refused under "
        "`rejected`)",
        "content": {"application/json": {"schema": refs[(Accepted, "serialization")]}},
    }
    error = {"application/json": {"schema": refs[(Error, "serialization")]}}
    answers = {
        "200": ok,
        **{
            str(code): {
                "description": answer["description"],
                "content": error,
                **({"headers": answer["headers"]} if "headers" in answer else {}),
            }
            for code, answer in responses(400, 401, 403, 413, 415, 429, 503).items()
        },
    }
    paths = {
        f"/v1/{name}": {
            "post": {
                "tags": ["collector"],
                "summary": f"Collect {name}",
                "description": f"Also at `/v1/{name[0]}` (Segment's analytics.js 2.0)"
                + (
                    " and `/beacon/v1/batch?writeKey=` (RudderStack's SDK in beacon mode)."
                    if name == "batch"
                    else "."
                ),
                "operationId": f"collect_{name}_v1_{name}_post",
                "security": [{"writeKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(model, "validation")]}},
                },
                "responses": answers,
            }
        }
        for name, model in bodies
    }
    return paths, top.get("$defs", {})
