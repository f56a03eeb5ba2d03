"""What the OpenAPI document at ``/openapi.json`` says beyond FastAPI's defaults: the error
bodies the server really sends, the statuses of each operation, and the two security
schemes (the collector's write key as HTTP Basic, the API's Bearer tokens with scopes).

The document is for generated clients and API fuzzers (tests/api/test_openapi.py drives
schemathesis over it), so every status code and body here is what the code answers:

* the collector and its webhooks answer errors as ``{"success": false, "error": ...}``
  (:class:`Error`; a refused single event adds ``rejected``), Segment's form;
* the API answers FastAPI's ``{"detail": ...}`` (:class:`Detail`): a message, or a list
  of problems for a 422;
* a database or event bus that is unavailable is a 503 with ``Retry-After`` and an
  :class:`Error` body on every route (``cdp_stream.app``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from cdp_stream.profiles.credentials import ALL_SCOPES


class Refused(BaseModel):
    """An event that was refused, and why (it went to ``cdp.events.rejected``)."""

    index: int = Field(description="its position in the batch (0 for a single call)")
    messageId: str | None = None
    reason: str


class Accepted(BaseModel):
    """The events were published (a batch lists the ones it refused under ``rejected``)."""

    success: Literal[True]
    rejected: list[Refused] | None = Field(default=None, description="absent when none")


class WebhookAccepted(Accepted):
    accepted: int = Field(description="provider events published as track events")


class Error(BaseModel):
    """The collector's error body, and every 503's."""

    success: Literal[False]
    error: str
    rejected: list[Refused] | None = Field(
        default=None, description="a refused single event: why (absent otherwise)"
    )


class Detail(BaseModel):
    """The API's error body: a message, or (422) the problems with the request."""

    detail: str | list[dict[str, Any]]


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before sending again",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
_MEANING = {
    400: "the request is malformed or holds a value the server refuses",
    401: "missing or unknown credentials",
    403: "the credentials may not do this",
    404: "not found",
    409: "conflicts with the current state",
    413: "request or event over the size limit",
    415: "Content-Encoding other than gzip",
    422: "the request's parameters or body are invalid: `detail` lists each problem",
    429: "the write key's rate limit: nothing accepted, send again after Retry-After seconds",
    503: "the database or the event bus is unavailable: nothing done, retry after "
    "Retry-After seconds",
}


def responses(*codes: int, model: type[BaseModel] = Detail) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these error statuses, with ``model`` as their body (a
    503 and a 429 are always :class:`Error` with Retry-After)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        answer: dict[str, Any] = {"description": _MEANING[code], "model": model}
        if code in (429, 503):
            answer = {**answer, "model": Error, "headers": RETRY_AFTER}
        out[code] = answer
    return out


SECURITY_SCHEMES: dict[str, Any] = {
    "writeKey": {
        "type": "http",
        "scheme": "basic",
        "description": "the collector's: username = the source's write key, empty password "
        "(the tracking endpoints also take it as `writeKey` in the body)",
    },
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "the API's: an API token; each operation names the scope it needs "
        f"({', '.join(ALL_SCOPES)})",
    },
}


def secure(document: dict[str, Any]) -> dict[str, Any]:
    """The document with the security schemes, and without the ``authorization`` header
    parameter the token check declares (the schemes say it)."""
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            params = [
                p
                for p in operation.get("parameters", [])
                if not (p.get("in") == "header" and p.get("name", "").lower() == "authorization")
            ]
            if params:
                operation["parameters"] = params
            else:
                operation.pop("parameters", None)
    return document
