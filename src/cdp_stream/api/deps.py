"""Request-scoped dependencies (the database connection, the token's scopes) and the
opaque cursors of the newest-first listings."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.profiles.credentials import Token, token_for_secret


async def connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """One connection and transaction per request; code below never commits."""
    engine: AsyncEngine = request.app.state.engine
    async with engine.begin() as conn:
        yield conn


Conn = Annotated[AsyncConnection, Depends(connection)]


def require_scope(scope: str) -> Callable[..., Coroutine[Any, Any, Token]]:
    async def check(conn: Conn, authorization: Annotated[str | None, Header()] = None) -> Token:
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise HTTPException(
                401, "Bearer API token required", headers={"WWW-Authenticate": "Bearer"}
            )
        token = await token_for_secret(conn, secret.strip())
        if token is None:
            raise HTTPException(401, "unknown API token", headers={"WWW-Authenticate": "Bearer"})
        if scope not in token.scopes:
            raise HTTPException(403, f"token lacks scope {scope!r}")
        return token

    return check


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
