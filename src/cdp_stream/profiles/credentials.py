"""Sources (public write keys) and API tokens (secret, scoped): their SQL, the one home
of it (the collector's auth, the sources API and the bootstrap at start-up all read and
write them here).

Write keys only let a client write events; API tokens read profiles and administer. A
token is shown once when created and stored as its SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import api_tokens, sources

# ``audiences:members`` lists who is in an audience, with their identifiers: personal
# data in bulk, so a token for audience sizes and counts (the DMP's) need not carry it.
ALL_SCOPES = (
    "profiles:read",
    "profiles:write",
    "profiles:delete",
    "audiences:write",
    "audiences:members",
    "admin",
)


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


@dataclass(frozen=True)
class Source:
    id: str
    allowed_origins: tuple[str, ...]
    rate_limit_per_s: float | None = None  # None: the Settings default
    rate_limit_burst: int | None = None


async def source_for_write_key(conn: AsyncConnection, write_key: str) -> Source | None:
    """The source the write key belongs to, or None."""
    columns = (sources.c.id, sources.c.allowed_origins, sources.c.rate_limit_per_s)
    row = (
        await conn.execute(
            select(*columns, sources.c.rate_limit_burst).where(sources.c.write_key == write_key)
        )
    ).one_or_none()
    if row is None:
        return None
    return Source(row.id, tuple(row.allowed_origins), row.rate_limit_per_s, row.rate_limit_burst)


@dataclass(frozen=True, slots=True)
class SourceRow:
    """A source as an administrator sees it (its write key included)."""

    id: str
    name: str
    write_key: str
    allowed_origins: list[str]
    rate_limit_per_s: float | None
    rate_limit_burst: int | None
    created_at: datetime


def _source_row(row: Any) -> SourceRow:
    return SourceRow(**{c.name: row._mapping[c.name] for c in sources.c})


async def list_sources(conn: AsyncConnection) -> list[SourceRow]:
    rows = await conn.execute(select(sources).order_by(sources.c.created_at, sources.c.id))
    return [_source_row(row) for row in rows]


async def create_source(
    conn: AsyncConnection, name: str, allowed_origins: list[str], **limits: object
) -> str:
    """A new source with a new write key (and ``limits``: ``rate_limit_per_s``,
    ``rate_limit_burst``); its id."""
    source_id = "src_" + secrets.token_hex(6)
    await ensure_source(conn, source_id, name, new_write_key(), allowed_origins)
    if limits:
        await update_source(conn, source_id, limits)
    return source_id


async def read_source(conn: AsyncConnection, source_id: str) -> SourceRow | None:
    row = (await conn.execute(select(sources).where(sources.c.id == source_id))).one_or_none()
    return None if row is None else _source_row(row)


async def update_source(
    conn: AsyncConnection, source_id: str, changes: dict[str, object]
) -> SourceRow | None:
    """The source after ``changes`` (name, allowed_origins, rate limits), or None if there
    is none."""
    if not changes:
        return await read_source(conn, source_id)
    stmt = update(sources).where(sources.c.id == source_id).values(**changes)
    row = (await conn.execute(stmt.returning(*sources.c))).one_or_none()
    return None if row is None else _source_row(row)


async def all_allowed_origins(conn: AsyncConnection) -> set[str]:
    """Every origin pattern any source allows (what a CORS preflight is judged by)."""
    rows = await conn.execute(select(func.unnest(sources.c.allowed_origins)).distinct())
    return set(rows.scalars())


async def ensure_source(
    conn: AsyncConnection,
    source_id: str,
    name: str,
    write_key: str,
    allowed_origins: list[str] | None = None,
) -> None:
    """Create the source with this write key unless it exists (idempotent); given
    ``allowed_origins`` replace the existing source's list."""
    stmt = insert(sources).values(
        id=source_id, name=name, write_key=write_key, allowed_origins=allowed_origins or []
    )
    if allowed_origins is None:
        await conn.execute(stmt.on_conflict_do_nothing())
    else:
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[sources.c.id], set_={"allowed_origins": allowed_origins}
            )
        )


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
    conn: AsyncConnection,
    write_key: str | None,
    api_token: str | None,
    allowed_origins: list[str] | None = None,
) -> NewCredentials:
    """Make the configured credentials exist; with none configured, create a default pair
    the first time only (a later start finds a source and creates nothing). Configured
    ``allowed_origins`` are set on the configured source, else on the default one."""
    if write_key or api_token:
        if write_key:
            sid = "src_" + hash_token(write_key)[:12]
            await ensure_source(conn, sid, "bootstrap", write_key, allowed_origins)
        if api_token:
            tid = "tok_" + hash_token(api_token)[:12]
            await ensure_token(conn, tid, "bootstrap", api_token, ALL_SCOPES)
        return NewCredentials()
    if await has_any_source(conn):
        if allowed_origins is not None:
            await conn.execute(
                update(sources)
                .where(sources.c.id == "src_default")
                .values(allowed_origins=allowed_origins)
            )
        return NewCredentials()
    key, token = new_write_key(), new_api_token()
    await ensure_source(conn, "src_default", "default", key, allowed_origins)
    await ensure_token(conn, "tok_default", "default", token, ALL_SCOPES)
    return NewCredentials(write_key=key, api_token=token)
