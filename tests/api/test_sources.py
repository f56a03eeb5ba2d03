"""``/v1/sources`` on the real Postgres server (admin scope), and the bootstrap source's
origins from the settings."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.api.sources import router
from cdp_stream.profiles.credentials import bootstrap_credentials, hash_token, source_for_write_key
from cdp_stream.profiles.models import sources
from tests.support import api_client

ADMIN_TOKEN = "tok_src_admin_" + uuid.uuid4().hex
READ_TOKEN = "tok_src_read_" + uuid.uuid4().hex
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    tokens = {ADMIN_TOKEN: ("admin",), READ_TOKEN: ("profiles:read",)}
    async with api_client(engine, router, tokens) as client:
        yield client


async def test_create_list_and_change_origins(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    r = await api.post(
        "/v1/sources",
        json={
            "name": "Web shop",
            "allowed_origins": [
                "https://Shop.example.com/",
                "https://*.ex.io",
                "https://shop.example.com",
            ],
        },
        headers=AUTH,
    )
    assert r.status_code == 201
    created = r.json()
    assert created["name"] == "Web shop" and created["write_key"].startswith("wk_")
    assert created["allowed_origins"] == ["https://*.ex.io", "https://shop.example.com"]
    async with engine.connect() as conn:
        found = await source_for_write_key(conn, created["write_key"])
    assert found is not None and found.id == created["id"]
    assert found.allowed_origins == ("https://*.ex.io", "https://shop.example.com")

    listed = (await api.get("/v1/sources", headers=AUTH)).json()
    assert created in listed

    changed = await api.patch(
        f"/v1/sources/{created['id']}", json={"allowed_origins": ["*"]}, headers=AUTH
    )
    assert changed.status_code == 200
    assert changed.json() == {**created, "allowed_origins": ["*"]}
    renamed = await api.patch(f"/v1/sources/{created['id']}", json={"name": "Shop"}, headers=AUTH)
    assert renamed.json()["name"] == "Shop" and renamed.json()["allowed_origins"] == ["*"]
    # "*" would let any origin's preflight pass in the other tests sharing this database.
    narrowed = await api.patch(
        f"/v1/sources/{created['id']}", json={"allowed_origins": []}, headers=AUTH
    )
    assert narrowed.json()["allowed_origins"] == []


async def test_a_source_has_its_own_rate_limit_until_reset(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    r = await api.post(
        "/v1/sources",
        json={"name": "Flood-prone", "rate_limit_per_s": 50, "rate_limit_burst": 200},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["rate_limit_per_s"], created["rate_limit_burst"]) == (50.0, 200)
    async with engine.connect() as conn:
        found = await source_for_write_key(conn, created["write_key"])
    assert found is not None
    assert (found.rate_limit_per_s, found.rate_limit_burst) == (50.0, 200)
    url = f"/v1/sources/{created['id']}"
    renamed = await api.patch(url, json={"name": "Flood"}, headers=AUTH)
    assert renamed.json()["rate_limit_burst"] == 200  # an absent field is left as it is
    reset = await api.patch(url, json={"rate_limit_per_s": None}, headers=AUTH)
    assert reset.json()["rate_limit_per_s"] is None and reset.json()["rate_limit_burst"] == 200
    for bad in ({"rate_limit_per_s": 0}, {"rate_limit_burst": 0}, {"name": None, "x": 1}):
        assert (await api.patch(url, json=bad, headers=AUTH)).status_code == 422


async def test_bad_input_is_a_422_naming_the_field(api: httpx.AsyncClient) -> None:
    bad_origin = await api.post(
        "/v1/sources", json={"name": "x", "allowed_origins": ["shop.example.com"]}, headers=AUTH
    )
    assert bad_origin.status_code == 422
    detail = bad_origin.json()["detail"][0]
    assert detail["loc"] == ["body", "allowed_origins", 0]
    assert "is not an origin pattern" in detail["msg"]
    unknown_key = await api.post("/v1/sources", json={"name": "x", "origins": []}, headers=AUTH)
    assert unknown_key.status_code == 422
    no_name = await api.post("/v1/sources", json={"name": "  "}, headers=AUTH)
    assert no_name.status_code == 422
    missing = await api.patch("/v1/sources/src_nope", json={"name": "y"}, headers=AUTH)
    assert missing.status_code == 404


async def test_only_admins_see_or_change_sources(api: httpx.AsyncClient) -> None:
    assert (await api.get("/v1/sources")).status_code == 401
    reader = {"authorization": f"Bearer {READ_TOKEN}"}
    assert (await api.get("/v1/sources", headers=reader)).status_code == 403
    r = await api.post("/v1/sources", json={"name": "x"}, headers=reader)
    assert r.status_code == 403


async def test_configured_origins_are_set_on_the_bootstrap_source(engine: AsyncEngine) -> None:
    key = "wk_boot_" + uuid.uuid4().hex
    source_id = "src_" + hash_token(key)[:12]

    async def origins() -> list[str]:
        async with engine.connect() as conn:
            query = select(sources.c.allowed_origins).where(sources.c.id == source_id)
            return list((await conn.execute(query)).scalar_one())

    async with engine.begin() as conn:
        await bootstrap_credentials(conn, key, None, ["https://a.test"])
    assert await origins() == ["https://a.test"]
    async with engine.begin() as conn:  # unset: what is stored stays
        await bootstrap_credentials(conn, key, None, None)
    assert await origins() == ["https://a.test"]
    async with engine.begin() as conn:
        await bootstrap_credentials(conn, key, None, [])
    assert await origins() == []
