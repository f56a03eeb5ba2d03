"""``/v1/audiences`` on the real Postgres server: create (with its back-fill), read, list,
delete, scopes, and the 422 a bad rule gets. The app is only the router under test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.api.audiences import profile_router, router
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import audience_members
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings
from tests.support import api_client, stored_event

WRITER = "tok_aud_w_" + uuid.uuid4().hex  # audiences:write, profiles:read
READER = "tok_aud_r_" + uuid.uuid4().hex  # profiles:read
WRITE = {"authorization": f"Bearer {WRITER}"}
READ = {"authorization": f"Bearer {READER}"}


@pytest.fixture(scope="module")
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    both = APIRouter()
    both.include_router(router)
    both.include_router(profile_router)
    async with api_client(
        engine, both, {WRITER: ("audiences:write", "profiles:read"), READER: ("profiles:read",)}
    ) as client:
        yield client


def name() -> str:
    return f"audience {uuid.uuid4().hex[:10]}"


async def settled(api: httpx.AsyncClient, audience_id: str) -> dict[str, Any]:
    """The audience once its back-fill is done."""
    for _ in range(200):
        r = await api.get(f"/v1/audiences/{audience_id}", headers=READ)
        assert r.status_code == 200, r.text
        if r.json()["backfill"].get("status") == "done":
            return dict(r.json())
        await asyncio.sleep(0.05)
    raise AssertionError(f"the back-fill never finished: {r.json()}")


async def test_round_trip(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    anon, path = f"a-{uuid.uuid4().hex[:10]}", f"/pricing/{uuid.uuid4().hex[:6]}"
    at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    visit = {
        "type": "page",
        "messageId": f"m-{uuid.uuid4().hex}",
        "sourceId": "src_api_audiences",
        "timestamp": at,
        "receivedAt": at,
        "channel": "website",
        "anonymousId": anon,
        "properties": {"path": path},
    }
    await apply_with_retry(engine, [visit], IdentityRules.from_settings(Settings()))
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier("anonymous_id", anon))
    rule = {
        "and": [
            {"event": {"type": "page", "where": {"path": {"eq": path}}, "within": "7d"}},
            {"computed": "order_count", "eq": 0},
        ]
    }
    audience_name = name()
    r = await api.post("/v1/audiences", json={"name": audience_name, "rule": rule}, headers=WRITE)
    assert r.status_code == 201, r.text
    audience_id = r.json()["id"]

    got = await settled(api, audience_id)
    assert got["name"] == audience_name
    assert got["rule"]["and"][0]["event"]["count"] == {"gte": 1}  # stored with its defaults
    assert got["size"] == 1  # only this test's profile visited this path
    assert got["backfill"]["processed"] == got["backfill"]["total"] >= 1
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(audience_members.c.profile_id).where(
                audience_members.c.audience_id == uuid.UUID(audience_id)
            )
        )
        assert list(rows.scalars()) == [pid]

    listed = (await api.get("/v1/audiences", headers=READ)).json()
    assert [a["size"] for a in listed if a["id"] == audience_id] == [1]

    r = await api.post("/v1/audiences", json={"name": audience_name, "rule": rule}, headers=WRITE)
    assert r.status_code == 409, r.text

    assert (await api.delete(f"/v1/audiences/{audience_id}", headers=WRITE)).status_code == 204
    assert (await api.get(f"/v1/audiences/{audience_id}", headers=READ)).status_code == 404
    assert (await api.delete(f"/v1/audiences/{audience_id}", headers=WRITE)).status_code == 404
    async with engine.connect() as conn:  # members went with it
        rows = await conn.execute(
            select(audience_members.c.profile_id).where(
                audience_members.c.audience_id == uuid.UUID(audience_id)
            )
        )
        assert list(rows) == []


async def test_bad_rule_is_a_422_naming_each_problem(api: httpx.AsyncClient) -> None:
    rule = {
        "and": [{"trait": "plan", "equals": "pro"}, {"event": {"type": "page", "within": "7 days"}}]
    }
    r = await api.post("/v1/audiences", json={"name": name(), "rule": rule}, headers=WRITE)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert [(d["loc"], d["path"], d["type"]) for d in detail] == [
        (["body", "rule", "and", 0], "$.and[0]", "unknown_key"),
        (["body", "rule", "and", 1, "event", "within"], "$.and[1].event.within", "duration"),
    ]
    assert detail[0]["msg"].startswith("unknown operator 'equals'; expected one of: eq, ne")
    assert "'7 days' is not a duration" in detail[1]["msg"]

    r = await api.post("/v1/audiences", json={"name": name(), "rule": {"and": []}}, headers=WRITE)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "'and' needs at least one rule"
    r = await api.post("/v1/audiences", json={"name": " ", "rule": {"and": []}}, headers=WRITE)
    assert r.status_code == 422  # the name, by FastAPI's own validation


async def test_scopes(api: httpx.AsyncClient) -> None:
    body = {"name": name(), "rule": {"trait": "plan", "eq": "pro"}}
    assert (await api.post("/v1/audiences", json=body)).status_code == 401
    assert (await api.post("/v1/audiences", json=body, headers=READ)).status_code == 403
    assert (await api.get("/v1/audiences")).status_code == 401
    assert (await api.delete(f"/v1/audiences/{uuid.uuid4()}", headers=READ)).status_code == 403
    assert (await api.get(f"/v1/audiences/{uuid.uuid4()}", headers=READ)).status_code == 404
    r = await api.post("/v1/audiences", json=body, headers=WRITE)
    assert r.status_code == 201
    await settled(api, r.json()["id"])
    assert (await api.delete(f"/v1/audiences/{r.json()['id']}", headers=WRITE)).status_code == 204


async def identified(engine: AsyncEngine, plan: str) -> uuid.UUID:
    """A new person on ``plan``; their profile id."""
    user, at = f"u-{uuid.uuid4().hex[:10]}", datetime.now(UTC).isoformat()
    event = stored_event("src_api_audiences", "identify", at, userId=user, traits={"plan": plan})
    await apply_with_retry(engine, [event], IdentityRules.from_settings(Settings()))
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier("user_id", user))
    assert pid is not None
    return pid


async def test_edit_size_history_and_a_persons_audiences(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    plan_a, plan_b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    on_a, on_b = await identified(engine, plan_a), await identified(engine, plan_b)
    rule = {"trait": "plan", "eq": plan_a}
    r = await api.post("/v1/audiences", json={"name": name(), "rule": rule}, headers=WRITE)
    audience_id = r.json()["id"]
    assert (await settled(api, audience_id))["size"] == 1
    mine = (await api.get(f"/v1/profiles/{on_a}/audiences", headers=READ)).json()
    assert [(a["id"], a["name"]) for a in mine] == [
        (audience_id, (await settled(api, audience_id))["name"])
    ]
    assert (await api.get(f"/v1/profiles/{on_b}/audiences", headers=READ)).json() == []

    # A new rule: back-filled again; the member it no longer admits exits, the other enters.
    renamed = name()
    change = {"name": renamed, "rule": {"trait": "plan", "eq": plan_b}}
    r = await api.patch(f"/v1/audiences/{audience_id}", json=change, headers=WRITE)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == renamed
    got = await settled(api, audience_id)
    assert (got["size"], got["rule"]) == (1, {"trait": "plan", "eq": plan_b})
    assert (await api.get(f"/v1/profiles/{on_a}/audiences", headers=READ)).json() == []
    assert [
        a["id"] for a in (await api.get(f"/v1/profiles/{on_b}/audiences", headers=READ)).json()
    ] == [audience_id]
    sizes = (
        await api.get(f"/v1/audiences/{audience_id}/sizes", params={"step": "day"}, headers=READ)
    ).json()
    assert [s["size"] for s in sizes] == [1]  # one enter and one exit and one enter, today
    minutes = await api.get(
        f"/v1/audiences/{audience_id}/sizes", params={"step": "minute"}, headers=READ
    )
    assert minutes.json()[-1]["size"] == 1

    # Errors at their field: the rule's problems inside "rule", a taken name, no audience.
    r = await api.patch(
        f"/v1/audiences/{audience_id}", json={"rule": {"trait": "plan", "eqq": 1}}, headers=WRITE
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][:2] == ["body", "rule"]
    other = await api.post("/v1/audiences", json={"name": name(), "rule": rule}, headers=WRITE)
    await settled(api, other.json()["id"])
    r = await api.patch(
        f"/v1/audiences/{other.json()['id']}", json={"name": renamed}, headers=WRITE
    )
    assert r.status_code == 409
    assert (
        await api.patch(f"/v1/audiences/{uuid.uuid4()}", json={"name": name()}, headers=WRITE)
    ).status_code == 404
    assert (
        await api.patch(f"/v1/audiences/{audience_id}", json={}, headers=READ)
    ).status_code == 403
    assert (await api.get(f"/v1/audiences/{uuid.uuid4()}/sizes", headers=READ)).status_code == 404
    for made in (audience_id, other.json()["id"]):
        await api.delete(f"/v1/audiences/{made}", headers=WRITE)
