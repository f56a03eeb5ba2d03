"""Sources (public write keys) and API tokens (secret, scoped): their SQL.

Write keys only let a client write events; API tokens read profiles and administer. A
token is shown once when created and stored as its SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import api_tokens, sources

ALL_SCOPES = ("profiles:read", "profiles:write", "profiles:delete", "audiences:write", "admin")


@dataclass(frozen=True)
class Token:
    id: str
    name: str
    scopes: tuple[str, ...]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_write_key() -> str:
    return "wk_" + secrets.token_urlsafe(24)


def new_api_token() -> str:
    return "cdp_" + secrets.token_urlsafe(32)


async def source_for_write_key(conn: AsyncConnection, write_key: str) -> str | None:
    """The source id the write key belongs to, or None."""
    row = await conn.execute(select(sources.c.id).where(sources.c.write_key == write_key))
    return row.scalar_one_or_none()


async def ensure_source(conn: AsyncConnection, source_id: str, name: str, write_key: str) -> None:
    """Create the source with this write key unless it exists (idempotent)."""
    stmt = insert(sources).values(id=source_id, name=name, write_key=write_key)
    await conn.execute(stmt.on_conflict_do_nothing())


async def ensure_token(
    conn: AsyncConnection, token_id: str, name: str, token: str, scopes: tuple[str, ...]
) -> None:
    """Create the API token unless a token with this id or secret exists (idempotent)."""
    stmt = insert(api_tokens).values(
        id=token_id, name=name, token_hash=hash_token(token), scopes=list(scopes)
    )
    await conn.execute(stmt.on_conflict_do_nothing())


async def token_for_secret(conn: AsyncConnection, token: str) -> Token | None:
    row = (
        await conn.execute(
            select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.scopes).where(
                api_tokens.c.token_hash == hash_token(token)
            )
        )
    ).one_or_none()
    return None if row is None else Token(row.id, row.name, tuple(row.scopes))


async def has_any_source(conn: AsyncConnection) -> bool:
    return (await conn.execute(select(sources.c.id).limit(1))).first() is not None


@dataclass(frozen=True)
class NewCredentials:
    """Secrets created at this start, to show once."""

    write_key: str | None = None
    api_token: str | None = None


async def bootstrap_credentials(
    conn: AsyncConnection, write_key: str | None, api_token: str | None
) -> NewCredentials:
    """Make the configured credentials exist; with none configured, create a default pair
    the first time only (a later start finds a source and creates nothing)."""
    if write_key or api_token:
        if write_key:
            sid = "src_" + hash_token(write_key)[:12]
            await ensure_source(conn, sid, "bootstrap", write_key)
        if api_token:
            tid = "tok_" + hash_token(api_token)[:12]
            await ensure_token(conn, tid, "bootstrap", api_token, ALL_SCOPES)
        return NewCredentials()
    if await has_any_source(conn):
        return NewCredentials()
    key, token = new_write_key(), new_api_token()
    await ensure_source(conn, "src_default", "default", key)
    await ensure_token(conn, "tok_default", "default", token, ALL_SCOPES)
    return NewCredentials(write_key=key, api_token=token)
