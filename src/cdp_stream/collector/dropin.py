"""What the web libraries sites already run fetch when a page loads them, so that they work
unchanged with only their hosts pointed at the collector.

- Segment's analytics.js 2.0 (npm ``@segment/analytics-next``) reads
  ``GET <cdnURL>/v1/projects/<writeKey>/settings`` and loads nothing without it. The answer
  lists one integration, ``Segment.io``: the collector, at the host and scheme the request
  came to (behind a TLS proxy, as uvicorn's forwarded headers say) plus ``/v1``, so a page
  that set only ``cdnURL`` still sends here, never to Segment; the page's own ``apiHost``
  and ``protocol`` take precedence. Any other integration would make the library fetch
  that destination's code from Segment's CDN. Its own usage metrics are switched off
  (``sampleRate`` 0): the collector keeps no such endpoint.
- RudderStack's JavaScript SDK v3 (npm ``@rudderstack/analytics-js``) reads
  ``GET <configUrl>/sourceConfig/?...&writeKey=<writeKey>`` by XHR with HTTP Basic auth
  (preflighted, so ``cors`` lists its headers). The answer is the source, enabled, with no
  device-mode destinations; without the ``destinations`` array the SDK refuses it.

Both are judged like events (``routes``): an unknown write key is a 401 and a page of an
origin the source does not list a 403 without CORS headers, so the library loads nothing
and sends nothing. The sources come from the collector's memory (``auth.Sources``), not
from a query per page view. Events then go to the tracking paths of ``routes``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from cdp_stream.collector.auth import Sources, basic_username
from cdp_stream.collector.cors import cors_headers, origin_allowed
from cdp_stream.collector.routes import error_response, preflight
from cdp_stream.openapi import Error, responses
from cdp_stream.profiles.credentials import Source

router = APIRouter(tags=["collector"])

SEGMENT_SETTINGS = "/v1/projects/{write_key}/settings"
RUDDERSTACK_CONFIG = ("/sourceConfig/", "/sourceConfig")


class SegmentDestination(BaseModel):
    """Where analytics.js 2.0 sends events: ``<protocol>://<apiHost>/<t|p|i|g|a|s|b>``."""

    apiKey: str = Field(description="the write key")
    apiHost: str = Field(description="the collector's host and port, and /v1")
    protocol: Literal["http", "https"]


class SegmentSettings(BaseModel):
    """A source's settings as analytics.js 2.0 reads them."""

    integrations: dict[Literal["Segment.io"], SegmentDestination]
    metrics: dict[Literal["sampleRate"], int] = Field(description="usage metrics: off")


class RudderStackSource(BaseModel):
    id: str
    config: dict[str, Any]
    enabled: Literal[True]
    destinations: list[dict[str, Any]] = Field(description="device-mode ones: none")


class RudderStackConfig(BaseModel):
    """A source as RudderStack's SDK v3 reads it from its control plane."""

    source: RudderStackSource


def _answers(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    refusals = responses(401, 403, 503, model=Error)
    refusals[403] = {**refusals[403], "description": "the page's origin is not listed"}
    return {200: {"model": model, "description": "the configuration"}, **refusals}


async def _judged(request: Request, write_key: str | None) -> Source | Response:
    """The key's source if this page may load it; otherwise the refusal to answer."""
    sources: Sources = request.app.state.sources
    source = await sources.by_write_key(write_key) if write_key else None
    if source is None:
        return error_response(401, "missing or unknown write key")
    origin = request.headers.get("origin")
    if origin is not None and not origin_allowed(origin, source.allowed_origins):
        return error_response(403, f"origin {origin!r} may not load this source")
    return source


def _answer(request: Request, body: dict[str, Any]) -> JSONResponse:
    origin = request.headers.get("origin")
    return JSONResponse(body, headers=cors_headers(origin) if origin is not None else None)


@router.get(
    SEGMENT_SETTINGS,
    summary="analytics.js 2.0 settings of a write key",
    responses=_answers(SegmentSettings),
)
async def segment_settings(write_key: str, request: Request) -> Response:
    """The source's settings as analytics.js 2.0 reads them from Segment's CDN."""
    judged = await _judged(request, write_key)
    if isinstance(judged, Response):
        return judged
    collector = {
        "apiKey": write_key,
        "apiHost": f"{request.url.netloc}/v1",
        "protocol": request.url.scheme,
    }
    return _answer(
        request,
        {"integrations": {"Segment.io": collector}, "metrics": {"sampleRate": 0}},
    )


@router.get(
    RUDDERSTACK_CONFIG[0],
    summary="RudderStack SDK v3 source config of a write key",
    responses=_answers(RudderStackConfig),
    openapi_extra={"security": [{"writeKey": []}]},
)
@router.head(RUDDERSTACK_CONFIG[0], include_in_schema=False)
@router.get(RUDDERSTACK_CONFIG[1], include_in_schema=False)
@router.head(RUDDERSTACK_CONFIG[1], include_in_schema=False)
async def rudderstack_source_config(
    request: Request, write_key: Annotated[str | None, Query(alias="writeKey")] = None
) -> Response:
    """The source as RudderStack's SDK v3 reads it from its control plane (the write key in
    the query string, or in Basic auth alone when the SDK probes for ad blockers)."""
    write_key = write_key or basic_username(request.headers.get("authorization"))
    judged = await _judged(request, write_key)
    if isinstance(judged, Response):
        return judged
    source = {"id": judged.id, "config": {}, "enabled": True, "destinations": []}
    return _answer(request, {"source": source})


@router.options(SEGMENT_SETTINGS, include_in_schema=False)
@router.options(RUDDERSTACK_CONFIG[0], include_in_schema=False)
@router.options(RUDDERSTACK_CONFIG[1], include_in_schema=False)
async def config_preflight(request: Request) -> Response:
    return await preflight(request)
