"""Fixtures of the collector's tests: a collector app whose source lists one origin (on
real Postgres, with a memory bus that records what was published); for the browser tests,
the collector on a socket behind a ``Gate`` (over the ``runtime`` each browser test module
starts)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.base import Record
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.profiles.credentials import ensure_source
from cdp_stream.settings import Settings
from tests.support import Gate, Server, free_port, gate_of, gated_collector, uid

SHOP = "https://shop.example.com"


@pytest.fixture(scope="module")
def collector_port() -> int:
    """Chosen first: the site's pages need the collector's address."""
    return free_port()


@pytest.fixture(scope="module")
async def collector(collector_port: int, runtime: Runtime) -> AsyncIterator[Server]:
    async with gated_collector(runtime, collector_port) as server:
        yield server


@pytest.fixture
def gate(collector: Server) -> Gate:
    return gate_of(collector)


class RecordingBus(MemoryBus):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[Record] = []

    async def publish_many(self, records: Sequence[Record]) -> None:
        self.published.extend(records)
        await super().publish_many(records)


@pytest.fixture
async def web(engine: AsyncEngine) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingBus, str]]:
    """A collector whose source (its write key returned) allows SHOP only."""
    write_key = uid("wk")
    async with engine.begin() as conn:
        await ensure_source(conn, uid("src"), "shop", write_key, [SHOP])
        await ensure_source(conn, uid("src"), "server", uid("wk"), [])
    bus = RecordingBus()
    app = create_app(Runtime(Settings(retry_after_s=2), "test", engine, bus))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client, bus, write_key
