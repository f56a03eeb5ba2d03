"""Helpers shared by tests (fixtures live in the conftest files)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.app import Runtime
from cdp_stream.profiles.credentials import ensure_token
from cdp_stream.resolver.identity import IdentityRules
from cdp_stream.settings import Settings


async def eventually(
    probe: Callable[[], Awaitable[Any]], within_s: float = 20.0, interval: float = 0.1
) -> Any:
    """Poll ``probe`` until it returns a truthy value (the pipeline is asynchronous); the
    last result (falsy) when ``within_s`` runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        result = await probe()
        if result or loop.time() > deadline:
            return result
        await asyncio.sleep(interval)


def uid(prefix: str = "") -> str:
    """A unique id: tests share one database and one broker."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}" if prefix else uuid.uuid4().hex[:10]


def stored_event(
    source: str, type_: str, ts: str, *, channel: str = "server", **fields: Any
) -> dict[str, Any]:
    """An event as the resolver reads it from cdp.events (what the collector enriched)."""
    return {
        "type": type_,
        "messageId": uid("m"),
        "sourceId": source,
        "timestamp": ts,
        "receivedAt": ts,
        "channel": channel,
        **fields,
    }


@asynccontextmanager
async def api_client(
    engine: AsyncEngine, router: APIRouter, tokens: Mapping[str, tuple[str, ...]]
) -> AsyncIterator[httpx.AsyncClient]:
    """One router on its own app over httpx, with API tokens (secret -> scopes) created."""
    async with engine.begin() as conn:
        for secret, scopes in tokens.items():
            await ensure_token(conn, uid("tok"), "test", secret, scopes)
    app = FastAPI()
    app.state.engine = engine
    app.state.rules = IdentityRules.from_settings(Settings())
    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client


@asynccontextmanager
async def running_pipeline(
    kafka_bootstrap: str,
    pg_url: str,
    *,
    write_key: str,
    api_token: str,
    loops: Sequence[Callable[..., Awaitable[None]]],
) -> AsyncIterator[Runtime]:
    """A Runtime on the real broker and server, in topics of its own (nothing a shared
    broker holds from earlier runs is replayed), with consumer ``loops`` running."""
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=pg_url,
        bootstrap_write_key=write_key,
        bootstrap_api_token=api_token,
        resolver_poll_timeout_ms=50,
        topic_namespace=f"test-{uid()}.",
    )
    runtime = await Runtime.start(settings, "test")
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(run(runtime.bus, runtime.engine, settings, stop)) for run in loops
    ]
    try:
        yield runtime
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await runtime.stop()
