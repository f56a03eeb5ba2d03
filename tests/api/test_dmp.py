"""``GET /v1/dmp/audience-counts`` on the real Postgres server, through its own small app
(the router alone, as app.py mounts it) and httpx's ASGI transport."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.api.dmp import router
from cdp_stream.profiles.models import audiences, dmp_audience_counts
from cdp_stream.settings import Settings
from tests.support import api_client

READ_TOKEN = "tok_dmp_read_" + uuid.uuid4().hex
OTHER_TOKEN = "tok_dmp_other_" + uuid.uuid4().hex
AUTH = {"authorization": f"Bearer {READ_TOKEN}"}
# A day no count run in the tests measures (a run rewrites the current windows' rows).
DAY = datetime(2023, 2, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(
        engine, router, {READ_TOKEN: ("profiles:read",), OTHER_TOKEN: ("audiences:write",)}
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def audience(engine: AsyncEngine) -> uuid.UUID:
    """An audience with rows in two hourly windows and one daily window."""
    audience_id = uuid.uuid4()
    rows: list[dict[str, Any]] = []
    for window, start in (("hour", DAY), ("hour", DAY + timedelta(hours=1)), ("day", DAY)):
        for dimension, bucket, count in (
            ("overall", "all", 240),
            ("country", "DE", 130),
            ("country", "FR", 110),
        ):
            rows.append(
                {
                    "audience_id": audience_id,
                    "window": window,
                    "window_start": start,
                    "dimension": dimension,
                    "bucket": bucket,
                    "count": count,
                    "epsilon": 0.5,
                }
            )
    async with engine.begin() as conn:
        name = f"dmp api {uuid.uuid4().hex[:8]}"
        await conn.execute(insert(audiences).values(id=audience_id, name=name, rule={}))
        await conn.execute(insert(dmp_audience_counts), rows)
    return audience_id


async def counts(api: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await api.get("/v1/dmp/audience-counts", headers=AUTH, params=params)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_counts_of_one_audience_newest_window_first(
    api: httpx.AsyncClient, audience: uuid.UUID
) -> None:
    items = await counts(api, audience=str(audience))
    assert len(items) == 9
    assert items[0] == {
        "audience_id": str(audience),
        "window": "hour",
        "window_start": "2023-02-01T01:00:00Z",
        "dimension": "overall",
        "bucket": "all",
        "count": 240,
        "epsilon": 0.5,
    }
    starts = [i["window_start"] for i in items]
    assert starts == sorted(starts, reverse=True)
    assert all(set(i) == set(items[0]) for i in items)


async def test_filters(api: httpx.AsyncClient, audience: uuid.UUID) -> None:
    day = await counts(api, audience=str(audience), window="day")
    assert {(i["window"], i["dimension"], i["bucket"]) for i in day} == {
        ("day", "overall", "all"),
        ("day", "country", "DE"),
        ("day", "country", "FR"),
    }
    later = await counts(api, audience=str(audience), since="2023-02-01T00:30:00Z")
    assert {i["window_start"] for i in later} == {"2023-02-01T01:00:00Z"}
    naive = await counts(api, audience=str(audience), since="2023-02-01T01:00:00")  # UTC
    assert len(naive) == 3
    offset = await counts(api, audience=str(audience), since="2023-02-01T02:00:00+01:00")
    assert len(offset) == 3
    assert len(await counts(api, audience=str(audience), limit=2)) == 2
    every = await counts(api, since="2023-02-01T00:00:00Z", limit=10_000)
    assert {i["audience_id"] for i in every} >= {str(audience)}


async def test_unknown_audience_and_bad_parameters(api: httpx.AsyncClient) -> None:
    url = "/v1/dmp/audience-counts"
    r = await api.get(url, headers=AUTH, params={"audience": str(uuid.uuid4())})
    assert r.status_code == 404
    for params in (
        {"audience": "not-a-uuid"},
        {"window": "week"},
        {"since": "yesterday"},
        {"since": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
        {"limit": 0},
        {"limit": 10_001},
    ):
        r = await api.get(url, headers=AUTH, params=params)
        assert r.status_code == 422, (params, r.text)


async def test_needs_a_token_with_profiles_read(api: httpx.AsyncClient) -> None:
    url = "/v1/dmp/audience-counts"
    assert (await api.get(url)).status_code == 401
    assert (await api.get(url, headers={"authorization": "Bearer nope"})).status_code == 401
    other = {"authorization": f"Bearer {OTHER_TOKEN}"}
    assert (await api.get(url, headers=other)).status_code == 403


async def test_anonymization_states_k_epsilon_and_the_vocabularies(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/dmp/anonymization", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    settings = Settings()
    assert (body["k"], body["epsilon"], body["windows"]) == (
        settings.dmp_k,
        settings.dmp_epsilon,
        settings.dmp_windows,
    )
    assert list(body["dimensions"]) == settings.dmp_dimensions
    assert body["dimensions"]["device_type"] == ["desktop", "mobile", "tablet", "unknown"]
    assert {"DE", "FR", "unknown"} <= set(body["dimensions"]["country"])
    assert (await api.get("/v1/dmp/anonymization")).status_code == 401
