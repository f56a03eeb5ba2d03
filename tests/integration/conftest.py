"""A whole pipeline in this process on the real broker and server: collector + API app
(driven through httpx's ASGI transport), a resolver task and an activation task."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from cdp_stream.activation.consumer import run_activation
from cdp_stream.app import Runtime, create_app
from cdp_stream.resolver.consumer import run_resolver
from tests.support import eventually, running_pipeline

WRITE_KEY = "wk_test_" + uuid.uuid4().hex[:8]
API_TOKEN = "tok_test_" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
async def pipeline(kafka_bootstrap: str, pg_url: str) -> AsyncIterator[Runtime]:
    loops = (run_resolver, run_activation)
    async with running_pipeline(
        kafka_bootstrap, pg_url, write_key=WRITE_KEY, api_token=API_TOKEN, loops=loops
    ) as runtime:
        yield runtime


@pytest.fixture(scope="session")
async def client(pipeline: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(pipeline)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4242))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as c:
        yield c


AUTH = {"authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture
def profile_of(
    client: httpx.AsyncClient,
) -> Callable[..., Awaitable[dict[str, Any] | None]]:
    """Wait for the profile of ``ref`` to exist (and satisfy ``until``), return its JSON."""

    async def get(
        ref: str, until: Callable[[dict[str, Any]], bool] = lambda p: True
    ) -> dict[str, Any] | None:
        async def probe() -> dict[str, Any] | None:
            r = await client.get(f"/v1/profiles/{ref}", headers=AUTH)
            if r.status_code == 200 and until(r.json()):
                return dict(r.json())
            return None

        result: dict[str, Any] | None = await eventually(probe)
        return result

    return get
