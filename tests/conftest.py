"""Shared fixtures: the real Postgres server and Kafka broker that ``make test`` starts.

A test that needs one of them and cannot reach it fails under ``CI=true`` and skips
(saying why) on a developer's machine.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.migrate import upgrade_to_head
from tests.operated import Stages, operated

if TYPE_CHECKING:
    from tests.collector.chromium import Chromium

PG_URL = os.environ.get(
    "CDP_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:55432/cdp_test"
)
# Shared CI machines are noisy: a wall-clock deadline per example would make tests flaky.
hypothesis_settings.register_profile("cdp", deadline=None)
hypothesis_settings.load_profile("cdp")

KAFKA = os.environ.get("CDP_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def unavailable(what: str) -> None:
    """Fail in CI, skip elsewhere: missing infrastructure is never a silent pass."""
    message = f"{what} is not reachable (start it with `make services`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _reachable(hostport: str) -> bool:
    host, _, port = hostport.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    if not _reachable(KAFKA):
        unavailable(f"Kafka at {KAFKA}")
    return KAFKA


@asynccontextmanager
async def fresh_database(prefix: str = "cdp_t") -> AsyncIterator[str]:
    """A new, migrated database on the real server, dropped afterwards."""
    admin = make_engine(PG_URL, "test-admin")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        async with admin.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    except (OSError, DBAPIError, TimeoutError) as exc:
        await admin.dispose()
        unavailable(f"Postgres at {PG_URL} ({exc})")
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url, "test-migrate")
    await upgrade_to_head(engine)
    await engine.dispose()
    try:
        yield url
    finally:
        async with admin.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture(scope="session")
async def pg_url() -> AsyncIterator[str]:
    """A fresh, migrated database for this test session on the real server."""
    async with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(pg_url, "test")
    yield eng
    await eng.dispose()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Chromium]:
    """Real headless Chromium (tests/collector/chromium.py), one per test module."""
    from tests.collector.chromium import Chromium  # it imports this module: not at the top

    chromium = await Chromium.launch()
    yield chromium
    await chromium.close()


@pytest.fixture(scope="session")
async def stages(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stages]:
    """Every stage a ``cdp-stream`` process, after real traffic (``tests/operated.py``), on
    a database of their own: their counts (audience members, DMP buckets) are of that
    traffic alone, whatever other tests stored before."""
    async with (
        fresh_database("cdp_ops") as url,
        operated(kafka_bootstrap, url, tmp_path_factory.mktemp("stages")) as s,
    ):
        yield s
