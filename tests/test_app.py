"""The HTTP app when Postgres is down: retryable 503s that say so, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.profiles.db import make_engine
from cdp_stream.settings import Settings


@pytest.fixture
async def client_without_database() -> AsyncIterator[httpx.AsyncClient]:
    # Nothing listens on port 1: every connection attempt is refused at once.
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", "test")
    runtime = Runtime(Settings(retry_after_s=3), "test", engine, MemoryBus())
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client
    await engine.dispose()


async def test_collector_answers_503_when_it_cannot_check_the_write_key(
    client_without_database: httpx.AsyncClient,
) -> None:
    r = await client_without_database.post(
        "/v1/track", json={"userId": "u", "event": "E"}, auth=("wk_any", "")
    )
    assert r.status_code == 503
    assert r.headers["retry-after"] == "3"
    assert r.json() == {"success": False, "error": "database unavailable, try again"}


async def test_api_answers_503(client_without_database: httpx.AsyncClient) -> None:
    r = await client_without_database.get(
        "/v1/profiles/user_id:u", headers={"authorization": "Bearer tok"}
    )
    assert r.status_code == 503


async def test_readiness_names_the_database(client_without_database: httpx.AsyncClient) -> None:
    r = await client_without_database.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable" and body["bus"] == "ok"
    assert body["database"].startswith("unavailable")
    assert (await client_without_database.get("/healthz")).status_code == 200
