"""Request-scoped dependencies (the database connection, the token's scopes), the API
tokens held in memory, and the opaque cursors of the newest-first listings."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.caching import Recall
from cdp_stream.collector.routes import database_unavailable
from cdp_stream.openapi import responses
from cdp_stream.profiles.credentials import Token, token_for_secret
from cdp_stream.profiles.db import is_invalid_value
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)
_MAX_TOKENS = 10_000  # bound memory under a flood of random secrets: the least recently used go


class Tokens:
    """API token secret -> token (None: unknown), from memory for ``ttl_s`` seconds.

    Asking Postgres on every request cost a pooled connection and a round trip per
    lookup. An answer is kept ``ttl_s`` and then dropped (never served stale): a token
    revoked in the database is refused at most ``ttl_s`` later, and a new one works within
    ``ttl_s`` of a first refusal. A secret not in memory is looked up once however many
    requests ask at that moment (single flight, as the collector's write keys), so an
    expiry under load costs one query, not one per request in flight; its failure reaches
    each of them (answered 503). At most ``_MAX_TOKENS`` secrets are held, the least
    recently used evicted first (``cdp_stream.caching``).
    """

    def __init__(
        self, engine: AsyncEngine, ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._engine = engine
        self._known: Recall[str, Token | None] = Recall(
            self._fetch, ttl=lambda _: ttl_s, maxsize=_MAX_TOKENS, what="API token", clock=clock
        )
        self.queries = 0  # database round trips made, for tests and the curious

    async def by_secret(self, secret: str) -> Token | None:
        return await self._known.get(secret)

    async def _fetch(self, secret: str) -> Token | None:
        self.queries += 1
        async with self._engine.connect() as conn:
            return await token_for_secret(conn, secret)


async def connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """One connection and transaction per request; code below never commits."""
    engine: AsyncEngine = request.app.state.engine
    async with engine.begin() as conn:
        yield conn


Conn = Annotated[AsyncConnection, Depends(connection)]


async def refusal(tokens: Tokens, authorization: str | None, scope: str) -> HTTPException | None:
    """Why a request with this ``Authorization`` header may not do ``scope`` (401, 403),
    or None when it may."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret:
        return HTTPException(
            401, "Bearer API token required", headers={"WWW-Authenticate": "Bearer"}
        )
    token = await tokens.by_secret(secret.strip())
    if token is None:
        return HTTPException(401, "unknown API token", headers={"WWW-Authenticate": "Bearer"})
    if scope not in token.scopes:
        return HTTPException(403, f"token lacks scope {scope!r}")
    return None


def require_scope(scope: str) -> Callable[..., Coroutine[Any, Any, None]]:
    async def check(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> None:
        refused = await refusal(request.app.state.tokens, authorization, scope)
        if refused is not None:
            raise refused

    return check


def database_error(exc: Exception, settings: Settings, where: str) -> JSONResponse:
    """Postgres down, too slow or its pool exhausted: a retryable 503, never a 500 with a
    stack trace, and a warning naming ``where`` (method and route template: the path may
    name a person); but a value from the request that Postgres refuses is the client's
    error (400), not an outage."""
    if isinstance(exc, DataError) or is_invalid_value(exc):
        orig = getattr(exc, "orig", exc)
        return JSONResponse({"detail": f"invalid value: {orig}"}, status_code=400)
    log.warning("%s: database unavailable: %r", where, exc)
    return database_unavailable(settings)


def cursor_at(when: datetime, row_id: int) -> str:
    """The cursor of a newest-first page that ends at (``when``, ``row_id``)."""
    return base64.urlsafe_b64encode(f"{when.isoformat()}|{row_id}".encode()).decode()


def position(cursor: str) -> tuple[datetime, int]:
    """A cursor back to its position; 400 for anything this API did not hand out."""
    try:
        when, _, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        at, row = in_utc(datetime.fromisoformat(when)), int(row_id)
    except (ValueError, OverflowError) as exc:
        raise HTTPException(400, "invalid cursor") from exc
    if not 0 < row < 2**63:
        raise HTTPException(400, "invalid cursor")
    return at, row


def in_utc(when: datetime) -> datetime:
    """``when`` in UTC (naive means UTC); OverflowError for a time Postgres cannot compare."""
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


def bearer(scope: str, *codes: int) -> dict[str, Any]:
    """Route keywords for an API operation that needs a token with ``scope``: the check,
    its security requirement and its answers (401, 403, 503 and ``codes``)."""
    return {
        "dependencies": [Depends(require_scope(scope))],
        "openapi_extra": {"security": [{"bearerAuth": [scope]}]},
        "responses": responses(*sorted({401, 403, 503, *codes})),
    }
