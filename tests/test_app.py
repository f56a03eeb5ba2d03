"""The HTTP app when Postgres is down or its pool is exhausted: retryable 503s that say so,
never a 500; and a process starting while Postgres or Kafka is not up yet: it waits, then
says what is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cdp_stream.app import Runtime, StartupFailed, create_app
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.profiles.credentials import ensure_source, ensure_token
from cdp_stream.profiles.db import make_engine
from cdp_stream.settings import Settings
from tests.support import free_port, uid


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


async def test_the_tracking_endpoints_are_documented_and_refuse_other_methods(
    client_without_database: httpx.AsyncClient,
) -> None:
    """They are plain ASGI endpoints served before FastAPI's routing: the OpenAPI document
    still lists them, with their request bodies."""
    doc = (await client_without_database.get("/openapi.json")).json()
    body = doc["paths"]["/v1/track"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/Track"}
    assert "`/v1/t`" in doc["paths"]["/v1/track"]["post"]["description"]
    assert "/sourceConfig/" in doc["paths"] and "/v1/projects/{write_key}/settings" in doc["paths"]
    assert {"Track", "Batch", "Context"} <= doc["components"]["schemas"].keys()
    assert "/v1/profiles/{ref}" in doc["paths"]
    r = await client_without_database.get("/v1/track")
    assert r.status_code == 405 and r.headers["allow"] == "OPTIONS, POST"
    r = await client_without_database.post("/v1/track/", json={}, auth=("wk_any", ""))
    assert r.status_code == 503  # served (it had to ask the database), not a 404


@pytest.fixture
async def client_with_busy_pool(
    pg_url: str, engine: AsyncEngine
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """An app whose pool has one connection, held by someone else: every request that needs
    the database meets SQLAlchemy's pool timeout (the field test's 500s). Yields the client
    and the write key of a source the collector has already seen."""
    key = uid("wk")
    async with engine.begin() as conn:
        await ensure_source(conn, uid("src"), "test", key, [])
    tiny = create_async_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    runtime = Runtime(Settings(retry_after_s=4), "test", tiny, MemoryBus())
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        seen = await client.post("/v1/track", json={"userId": "u", "event": "E"}, auth=(key, ""))
        assert seen.status_code == 200
        async with tiny.connect():
            yield client, key
    await tiny.dispose()


async def test_a_pool_timeout_is_503_with_retry_after_on_collector_and_api(
    client_with_busy_pool: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = client_with_busy_pool
    answers = await asyncio.gather(
        client.post("/v1/track", json={"userId": "u", "event": "E"}, auth=(uid("wk"), "")),
        client.get("/v1/profiles/user_id:u", headers={"authorization": "Bearer tok"}),
        client.get("/v1/sources", headers={"authorization": "Bearer tok"}),
    )
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "4"
        assert r.json() == {"success": False, "error": "database unavailable, try again"}


async def test_a_known_write_key_is_served_from_memory_while_the_pool_is_busy(
    client_with_busy_pool: tuple[httpx.AsyncClient, str],
) -> None:
    client, key = client_with_busy_pool
    r = await client.post("/v1/track", json={"userId": "u", "event": "E"}, auth=(key, ""))
    assert r.status_code == 200 and r.json() == {"success": True}


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tcp_proxy(port: int, target: tuple[str, int]) -> AsyncIterator[None]:
    """Listen on ``port`` and forward each connection to ``target`` (a service "coming up")."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)
        await asyncio.gather(_forward(reader, up_writer), _forward(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_start_waits_for_postgres_to_come_up(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    real = make_url(pg_url)
    port = free_port()
    late = real.set(port=port).render_as_string(hide_password=False)

    async def postgres_comes_up_later() -> None:
        await asyncio.sleep(1.5)
        async with tcp_proxy(port, (real.host or "127.0.0.1", real.port or 5432)):
            await asyncio.sleep(30)

    proxy = asyncio.create_task(postgres_comes_up_later())
    try:
        started = asyncio.get_running_loop().time()
        runtime = await Runtime.start(Settings(database_url=late, startup_timeout_s=20), "test")
        assert asyncio.get_running_loop().time() - started >= 1.5
        await runtime.stop()
    finally:
        proxy.cancel()
    assert any("waiting for Postgres at" in r.getMessage() for r in caplog.records)


async def test_start_gives_up_naming_what_did_not_answer(pg_url: str) -> None:
    down = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    with pytest.raises(StartupFailed, match=r"^Postgres at .*:1/none did not answer in time"):
        await Runtime.start(Settings(database_url=down, startup_timeout_s=1), "test")
    settings = Settings(database_url=pg_url, kafka_bootstrap="127.0.0.1:1", startup_timeout_s=1)
    with pytest.raises(
        StartupFailed, match=r"^Kafka did not answer in time \(Kafka at 127.0.0.1:1"
    ):
        await Runtime.start(settings, "test")


def test_the_command_says_what_is_down_in_one_line_and_exits_1() -> None:
    env = {
        **os.environ,
        "CDP_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none",
        "CDP_STARTUP_TIMEOUT_S": "1",
    }
    cli = Path(sys.executable).parent / "cdp-stream"
    done = subprocess.run([cli, "collector"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cdp-stream collector: cannot start: Postgres at postgresql+asyncpg://")
    assert "Traceback" not in done.stderr


async def test_a_value_postgres_refuses_is_the_clients_400_not_an_outage(
    engine: AsyncEngine,
) -> None:
    """A NUL character in text (found by schemathesis): asyncpg reports it as a plain
    DBAPIError (SQLSTATE 22021), which was answered 503 as if the database were down."""
    token = uid("tok")
    async with engine.begin() as conn:
        await ensure_token(conn, uid("tok"), "test", token, ("admin", "profiles:read"))
    transport = httpx.ASGITransport(
        app=create_app(Runtime(Settings(), "test", engine, MemoryBus()))
    )
    auth = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        r = await client.post("/v1/sources", json={"name": "shop\x00"}, headers=auth)
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("invalid value: ")
        # the profile lookup is a plain endpoint ahead of FastAPI: the same answer there
        r = await client.get("/v1/profiles/user_id:a%00b", headers=auth)
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("invalid value: ")
