"""``retrying`` against the real server: what a restart looks like to a connection is
retried until the database answers again; an error in the work itself is not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.identity import Identifier
from cdp_stream.profiles import reads
from cdp_stream.profiles.db import make_engine, read_only, retrying


@pytest.fixture
async def own_engine(pg_url: str) -> AsyncEngine:
    """An engine of the test's own: ``retrying`` disposes the pool of the one it is given."""
    return make_engine(pg_url, "test-db")


async def test_a_connection_ended_by_the_server_is_retried(own_engine: AsyncEngine) -> None:
    """``pg_ctl restart -m fast`` ends every backend with 57P01 ("terminating connection
    due to administrator command"); so does pg_terminate_backend."""
    attempts = 0

    async def work(conn: AsyncConnection) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return int((await conn.execute(text("SELECT 42"))).scalar_one())

    try:
        assert await retrying(own_engine, work) == 42
    finally:
        await own_engine.dispose()
    assert attempts == 2


async def test_pooled_connections_killed_in_between_are_not_met_again(
    own_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    """After a restart every pooled connection is dead; the work still runs."""
    async with own_engine.connect() as a, own_engine.connect() as b:  # two in the pool
        pids = [(await c.execute(text("SELECT pg_backend_pid()"))).scalar_one() for c in (a, b)]
    async with engine.connect() as admin:
        for pid in pids:
            await admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})

    async def work(conn: AsyncConnection) -> int:
        return int((await conn.execute(text("SELECT 7"))).scalar_one())

    try:
        assert await retrying(own_engine, work) == 7
    finally:
        await own_engine.dispose()


@pytest.mark.parametrize("run", [retrying, read_only])
async def test_an_error_of_the_work_is_raised_not_retried(
    own_engine: AsyncEngine, run: Callable[..., Awaitable[None]]
) -> None:
    attempts = 0

    async def work(conn: AsyncConnection) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute(text("SELECT 1 / 0"))

    try:
        with pytest.raises(DBAPIError, match="division by zero"):
            await run(own_engine, work)
    finally:
        await own_engine.dispose()
    assert attempts == 1


# --- a pooled connection the server closed, at checkout and in use ----------------------


async def _closed_in_pool(engine: AsyncEngine, admin: AsyncEngine) -> list[int]:
    """Two pooled connections of ``engine`` whose backends the server then ended (what a
    restart does to them), once the client has read the close; their backend pids."""
    async with engine.connect() as a, engine.connect() as b:  # two in the pool
        drivers = [(await c.get_raw_connection()).driver_connection for c in (a, b)]
        pids = [(await c.execute(text("SELECT pg_backend_pid()"))).scalar_one() for c in (a, b)]
    async with admin.connect() as conn:
        for pid in pids:
            await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    for _ in range(100):
        if all(d.is_closed() for d in drivers):
            return pids
        await asyncio.sleep(0.01)
    raise AssertionError("the client never saw the server close its connections")


async def test_a_closed_pooled_connection_is_replaced_at_checkout(
    own_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    """No retry needed and no ping: the work runs once, on a connection of its own."""
    pids = await _closed_in_pool(own_engine, engine)
    try:
        async with own_engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    finally:
        await own_engine.dispose()
    assert pid not in pids


async def test_read_only_runs_again_when_its_connection_dies_in_use(
    own_engine: AsyncEngine,
) -> None:
    """A connection that dies during the read (the server ends it then) is not seen at
    checkout; ``read_only`` runs the read again on a fresh one, outside a transaction."""
    calls, pids = 0, []

    async def work(conn: AsyncConnection) -> bool:
        nonlocal calls
        calls += 1
        pid, first = (await conn.execute(text("SELECT pg_backend_pid(), now()"))).one()
        pids.append(pid)
        if calls == 1:
            await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        await conn.execute(text("SELECT pg_sleep(0.01)"))
        return bool((await conn.execute(text("SELECT now()"))).scalar_one() > first)

    try:
        autocommit = await read_only(own_engine, work)
    finally:
        await own_engine.dispose()
    assert calls == 2 and pids[0] != pids[1]
    assert autocommit  # in one transaction, now() would stay at its start


async def test_connections_run_without_jit(own_engine: AsyncEngine) -> None:
    """Postgres's JIT costs tens of ms on a statement that runs in one: off for the app."""
    try:
        async with own_engine.connect() as conn:
            assert (await conn.execute(text("SHOW jit"))).scalar_one() == "off"
    finally:
        await own_engine.dispose()


async def test_read_only_reads_a_profile_again_when_the_server_ended_its_connection(
    own_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    """The API's lookup read (asyncpg itself, not SQLAlchemy) on a connection the server
    ended meanwhile: read again on a fresh one, as a read through SQLAlchemy would be."""
    calls = 0

    async def work(conn: AsyncConnection) -> reads.ProfileRow | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            async with engine.connect() as admin:
                await admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        return await reads.read_profile_of(conn, Identifier("user_id", "nobody"))

    try:
        assert await read_only(own_engine, work) is None
    finally:
        await own_engine.dispose()
    assert calls == 2
