"""Which web pages may send events with a source's write key (CORS, per source).

A source lists origin patterns: an exact origin (``https://shop.example.com``), a subdomain
wildcard (``https://*.example.com``) or ``*`` (any page). The browser library posts
``text/plain`` bodies: a CORS "simple" request, which needs no preflight but which the
browser also does not stop. So the collector judges the ``Origin`` itself: a request from
an origin the source does not list is refused (403, nothing published), and only listed
origins get the CORS headers that let the page read the answer. Server-side clients send
no ``Origin`` and are not affected. A preflight (a client sending ``application/json`` or
an ``Authorization`` header) carries no write key, so it passes when any source lists the
origin; the request that follows is judged by its own source.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

# The request headers the web libraries send, by name: a ``*`` would not cover
# ``Authorization``. analytics.js 2.0 adds X-Retry-Count on retries; RudderStack's SDK v3
# sends AnonymousId and SentAt with every event, the Rsa-* ones on retries and for events
# recovered from storage, and fetches its configuration by GET (HEAD to detect ad blockers).
ALLOWED_REQUEST_HEADERS = (
    "Authorization",
    "Content-Type",
    "Content-Encoding",
    "AnonymousId",
    "SentAt",
    "X-Retry-Count",
    "Rsa-Retry-Attempt",
    "Rsa-Since-Last-Attempt",
    "Rsa-Since-First-Attempt",
    "Rsa-Retry-Reason",
    "Rsa-Recovered",
)
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, HEAD, POST",
    "Access-Control-Allow-Headers": ", ".join(ALLOWED_REQUEST_HEADERS),
    "Access-Control-Max-Age": "600",
}


def _split(origin: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(origin)
        return parts.scheme, parts.hostname or "", parts.port
    except ValueError:  # a malformed port
        return None


def origin_allowed(origin: str, patterns: Iterable[str]) -> bool:
    """Whether a page of ``origin`` (the request's Origin header) matches a pattern."""
    origin = origin.lower()
    for pattern in patterns:
        if pattern in ("*", origin):
            return True
        if "://*." in pattern:
            want, got = _split(pattern.replace("*.", "", 1)), _split(origin)
            if want and got and want[::2] == got[::2] and got[1].endswith("." + want[1]):
                return True
    return False


def cors_headers(origin: str) -> dict[str, str]:
    """What lets a page of ``origin`` read the answer (and its Retry-After)."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "Retry-After",
        "Vary": "Origin",
    }
