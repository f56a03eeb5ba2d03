"""Low-level access to profiles shared by the stages and the API: advisory locks, the
driver's connection and COPY, and which canonical profile holds an id or an identifier.

Each domain's SQL lives with it (``resolver.repository``, ``profiles.reads``,
``profiles.erasure``, ``profiles.outbox``, ``profiles.credentials``); this module holds what
several of them need, below the stages so that any of them may import it. Callers own the
transaction. Invariant kept by the writers: an identity always points at a canonical
profile (``merged_into IS NULL``).
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.identity import Identifier
from cdp_stream.profiles.models import profiles
from cdp_stream.profiles.sql import among

T = TypeVar("T")


def lock_key(kind: str, value: str) -> int:
    """A signed 64-bit advisory-lock key for any string."""
    digest = hashlib.blake2b(f"{kind}\x1f{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_LOCK_KEYS = text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) k")


async def lock_keys(conn: AsyncConnection, keys: Iterable[int]) -> None:
    """Take transaction advisory locks in ascending order, so concurrent batches that
    touch the same identifiers queue up instead of deadlocking. Through SQLAlchemy, not
    ``driver``: often the transaction's first statement, which SQLAlchemy then begins
    with it, where ``driver`` would spend a round trip of its own on beginning it."""
    ordered = sorted(set(keys))
    if ordered:
        await conn.execute(_LOCK_KEYS, {"keys": ordered})


_TRY_LOCK_KEYS = text(
    "SELECT k FROM unnest(CAST(:keys AS bigint[])) k WHERE NOT pg_try_advisory_xact_lock(k)"
)


async def try_lock_keys(conn: AsyncConnection, keys: Iterable[int]) -> set[int]:
    """Take those of the transaction advisory locks that are free and return the keys
    another transaction holds, without waiting for them (so in no particular order: a
    transaction that never waits cannot be part of a deadlock)."""
    wanted = list(set(keys))
    if not wanted:
        return set()
    return set((await conn.execute(_TRY_LOCK_KEYS, {"keys": wanted})).scalars())


async def driver(conn: AsyncConnection, call: Callable[[Any], Awaitable[T]]) -> T:
    """``call`` with the asyncpg connection under ``conn``, in its transaction: asyncpg's
    records and COPY rather than SQLAlchemy's rows (thousands per batch). SQLAlchemy
    begins the transaction at its own first statement, so one is made first if none was."""
    async with _driver_of(conn) as db:
        if not db.is_in_transaction():
            await conn.execute(text("SELECT 1"))
        return await call(db)


async def fetch_row(conn: AsyncConnection, query: str, *args: Any) -> asyncpg.Record | None:
    """One row of ``query`` (``$1`` parameters) read by asyncpg itself on ``conn``'s
    connection, in its transaction if SQLAlchemy began one (a single statement needs
    none). For the API's profile lookups: SQLAlchemy's execute and result cost about as
    much client CPU as the rest of the read (0.22-0.27 against 0.13-0.15 ms a lookup)."""
    async with _driver_of(conn) as db:
        row: asyncpg.Record | None = await db.fetchrow(query, *args)
        return row


# The server ended the connection: admin_shutdown (a restart, pg_terminate_backend) and
# crash_shutdown, which asyncpg reports as plain server errors, and the client's error on
# a protocol exchange the close broke off ("cannot switch to state ...").
_ENDED = (
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,
)


@contextlib.asynccontextmanager
async def _driver_of(conn: AsyncConnection) -> AsyncIterator[Any]:
    """The asyncpg connection under ``conn``, its errors raised as SQLAlchemy's:
    ``retrying`` retries deadlocks and unique violations and waits out a lost
    connection, ``read_only`` reads again on a fresh connection, and the API answers 503
    to a database that is away. A connection the server ended is invalidated, as
    SQLAlchemy does with one its own statements find dead: the pool never hands it out
    again."""
    db = (await conn.get_raw_connection()).driver_connection
    assert db is not None
    try:
        yield db
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, *_ENDED) as exc:
        await conn.invalidate(exc)
        raise OperationalError(None, None, exc, connection_invalidated=True) from exc
    except asyncpg.PostgresError as exc:
        raise DBAPIError(None, None, exc) from exc


async def profiles_of(
    conn: AsyncConnection, ids: Sequence[Identifier]
) -> dict[Identifier, uuid.UUID]:
    """The profile holding each identifier (arrays, not an IN list: one plan per batch
    size, and no per-value parameters to compile)."""
    if not ids:
        return {}
    rows = await conn.execute(
        text(
            "SELECT i.type, i.value, i.profile_id FROM identities i JOIN unnest("
            "CAST(:types AS text[]), CAST(:values AS text[])) AS k(t, v)"
            " ON i.type = k.t AND i.value = k.v"
        ),
        {"types": [i.type for i in ids], "values": [i.value for i in ids]},
    )
    return {Identifier(r.type, r.value): r.profile_id for r in rows}


async def copy_records(
    conn: AsyncConnection, table: str, columns: Sequence[str], records: list[tuple[Any, ...]]
) -> None:
    """COPY ``records`` into ``table`` in the caller's transaction: one round trip and no
    per-row statement, several times faster than a multi-row INSERT."""
    if records:
        await driver(
            conn, lambda db: db.copy_records_to_table(table, records=records, columns=columns)
        )


def group_ids(canonical: uuid.UUID) -> Any:
    """The ids of a canonical profile and of every profile merged into it."""
    return select(profiles.c.id).where(
        (profiles.c.id == canonical) | (profiles.c.merged_into == canonical)
    )


async def canonical_id(conn: AsyncConnection, profile_id: uuid.UUID) -> uuid.UUID | None:
    """Follow ``merged_into`` to the canonical profile; None if the id is unknown."""
    return (await canonical_ids(conn, {profile_id})).get(profile_id)


async def canonical_ids(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """Each id's canonical profile (itself when canonical), for many at once; an unknown
    or deleted id is absent (so is one caught in a cycle, which no merge writes)."""
    out: dict[uuid.UUID, uuid.UUID] = {}
    pending = {i: i for i in ids}
    for _ in range(16):  # merges point straight at the canonical profile: 1-2 rounds
        if not pending:
            break
        rows = await conn.execute(
            select(profiles.c.id, profiles.c.merged_into).where(
                among(profiles.c.id, set(pending.values()))
            )
        )
        parent = {r.id: r.merged_into for r in rows}
        following: dict[uuid.UUID, uuid.UUID] = {}
        for origin, current in pending.items():
            if current not in parent:
                continue
            if parent[current] is None:
                out[origin] = current
            else:
                following[origin] = parent[current]
        pending = following
    return out


_CANONICAL_PROFILES = """
SELECT id, traits, computed FROM profiles WHERE id = ANY($1::uuid[]) AND merged_into IS NULL
"""


async def canonical_profiles(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """The canonical ones among ``ids`` as activation sees them, ``{"traits", "computed"}``:
    read once per activation batch, for the CRM's contacts and the audiences' rules (by
    ``driver``: thousands of rows a batch on a backlog)."""
    wanted = list(ids)
    rows = await driver(conn, lambda db: db.fetch(_CANONICAL_PROFILES, wanted))
    return {pid: {"traits": traits, "computed": computed} for pid, traits, computed in rows}


async def profile_for_identifier(conn: AsyncConnection, ident: Identifier) -> uuid.UUID | None:
    return (await profiles_of(conn, [ident])).get(ident)


# A profile as the API shows it, in one statement (one round trip): the row, its identities
# and the ids merged into it, aggregated by Postgres.
