"""API tokens from memory (``Tokens``) against the real Postgres server: one query however
many requests ask at once, and a revoked token refused once its ``ttl_s`` has passed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.api.deps import Tokens
from cdp_stream.api.profiles import router as profiles_router
from cdp_stream.identity import IdentityRules
from cdp_stream.profiles.credentials import ensure_token, hash_token
from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.models import api_tokens
from cdp_stream.settings import Settings
from tests.support import uid

TTL = 5.0


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def new_token(engine: AsyncEngine, scopes: tuple[str, ...] = ("profiles:read",)) -> str:
    secret = "cdp_" + uuid.uuid4().hex
    async with engine.begin() as conn:
        await ensure_token(conn, uid("tok"), "test", secret, scopes)
    return secret


async def revoke(engine: AsyncEngine, secret: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(api_tokens).where(api_tokens.c.token_hash == hash_token(secret)))


async def test_concurrent_requests_look_a_token_up_once(engine: AsyncEngine) -> None:
    tokens, secret = Tokens(engine), await new_token(engine)
    found = await asyncio.gather(*(tokens.by_secret(secret) for _ in range(50)))
    assert {t.scopes if t else None for t in found} == {("profiles:read",)}
    assert await tokens.by_secret(secret) == found[0]
    assert tokens.queries == 1


async def test_a_revoked_token_is_refused_once_the_ttl_has_passed(engine: AsyncEngine) -> None:
    clock = Clock()
    tokens, secret = Tokens(engine, ttl_s=TTL, clock=clock), await new_token(engine)
    assert await tokens.by_secret(secret) is not None
    await revoke(engine, secret)
    clock.now += TTL - 0.01
    assert await tokens.by_secret(secret) is not None  # the stated window: up to ttl_s
    clock.now += 0.01
    assert await tokens.by_secret(secret) is None
    assert tokens.queries == 2


async def test_an_unknown_token_works_within_the_ttl_of_being_created(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    tokens, secret = Tokens(engine, ttl_s=TTL, clock=clock), "cdp_" + uuid.uuid4().hex
    assert await tokens.by_secret(secret) is None
    async with engine.begin() as conn:
        await ensure_token(conn, uid("tok"), "test", secret, ("admin",))
    assert await tokens.by_secret(secret) is None  # remembered as unknown
    clock.now += TTL
    token = await tokens.by_secret(secret)
    assert token is not None and token.scopes == ("admin",)


async def test_a_failed_lookup_reaches_every_waiter_and_is_not_remembered() -> None:
    # Nothing listens on port 1: every connection attempt is refused at once.
    dead = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", "test")
    tokens = Tokens(dead)
    try:
        answers = await asyncio.gather(
            *(tokens.by_secret("cdp_x") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(a, DBAPIError | OSError) for a in answers), answers
        assert tokens.queries == 1
        with pytest.raises((DBAPIError, OSError)):
            await tokens.by_secret("cdp_x")
        assert tokens.queries == 2
    finally:
        await dead.dispose()


@pytest.fixture
async def clocked_api(engine: AsyncEngine) -> AsyncIterator[tuple[httpx.AsyncClient, Clock]]:
    """The profiles routes on an app whose tokens run on a clock the test moves."""
    clock, app = Clock(), FastAPI()
    app.state.engine = app.state.lookups = engine
    app.state.rules = IdentityRules.from_settings(Settings())
    app.state.tokens = Tokens(engine, ttl_s=TTL, clock=clock)
    app.include_router(profiles_router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client, clock


async def test_the_api_refuses_a_revoked_token_after_the_ttl(
    clocked_api: tuple[httpx.AsyncClient, Clock], engine: AsyncEngine
) -> None:
    api, clock = clocked_api
    secret = await new_token(engine)
    headers = {"authorization": f"Bearer {secret}"}
    nobody = f"/v1/profiles/user_id:{uid('nobody')}"
    assert (await api.get(nobody, headers=headers)).status_code == 404  # let in, not found
    await revoke(engine, secret)
    clock.now += TTL
    for path in (nobody, f"{nobody}/events", f"{nobody}/identities"):
        r = await api.get(path, headers=headers)
        assert r.status_code == 401 and r.json() == {"detail": "unknown API token"}, path


async def test_a_cached_token_still_needs_the_scope(
    clocked_api: tuple[httpx.AsyncClient, Clock], engine: AsyncEngine
) -> None:
    api, _ = clocked_api
    headers = {"authorization": f"Bearer {await new_token(engine, ('audiences:write',))}"}
    for _ in range(2):  # looked up, then from memory
        r = await api.get(f"/v1/profiles/user_id:{uid('u')}", headers=headers)
        assert r.status_code == 403
