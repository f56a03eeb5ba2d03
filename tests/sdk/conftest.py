"""The SDK's tests run against a real collector: the pipeline (collector, API, a resolver
task) on the real broker and database, served by uvicorn behind a recording Gate."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from cdp_stream.app import Runtime
from cdp_stream.resolver.consumer import run_resolver
from tests.support import Gate, Server, gate_of, gated_collector, running_pipeline

WRITE_KEY = "wk_sdk_" + uuid.uuid4().hex[:8]
API_TOKEN = "tok_sdk_" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
async def runtime(kafka_bootstrap: str, pg_url: str) -> AsyncIterator[Runtime]:
    async with running_pipeline(
        kafka_bootstrap, pg_url, write_key=WRITE_KEY, api_token=API_TOKEN, loops=[run_resolver]
    ) as rt:
        yield rt


@pytest.fixture(scope="module")
async def server(runtime: Runtime) -> AsyncIterator[Server]:
    async with gated_collector(runtime) as srv:
        yield srv


@pytest.fixture
def gate(server: Server) -> Gate:
    return gate_of(server)
