"""Request-scoped dependencies: the database connection and the token's scopes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
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
