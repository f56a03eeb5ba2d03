"""``/v1/audiences`` on the real Postgres server: create (with its back-fill), read, list,
delete, scopes, and the 422 a bad rule gets. The app is only the router under test."""

from __future__ import annotations

import asyncio
import csv
import io
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation import audiences
from cdp_stream.activation.audiences.rules import parse_rule
from cdp_stream.api.audiences import router
from cdp_stream.api.profiles import router as profiles_router
from cdp_stream.identity import BUILT_IN, Identifier, IdentityRules
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import audience_members
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings
from tests.support import api_app, api_client, stored_event, uid

WRITER = "tok_aud_w_" + uuid.uuid4().hex  # audiences:write, profiles:read
READER = "tok_aud_r_" + uuid.uuid4().hex  # profiles:read
LISTER = "tok_aud_m_" + uuid.uuid4().hex  # audiences:members
WRITE = {"authorization": f"Bearer {WRITER}"}
READ = {"authorization": f"Bearer {READER}"}
MEMBERS = {"authorization": f"Bearer {LISTER}"}
TOKENS = {
    WRITER: ("audiences:write", "profiles:read"),
    READER: ("profiles:read",),
    LISTER: ("audiences:members",),
}


@pytest.fixture(scope="module")
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    both = APIRouter()
    both.include_router(router)
    both.include_router(profiles_router)
    async with api_client(engine, both, TOKENS) as client:
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


# --- members: listed, per profile, exported ---------------------------------------------


async def test_members_are_listed_with_their_identifiers_under_their_own_scope(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    run, at = uid("m"), datetime.now(UTC).isoformat()
    people = [(f"u-{run}-{i}", f"e-{run}-{i}@example.com") for i in range(3)]
    plan = {"trait": "plan", "eq": run}
    await apply_with_retry(
        engine,
        [
            stored_event(
                "src_api_audiences", "identify", at, userId=u, traits={"email": e, "plan": run}
            )
            for u, e in people
        ],
        IdentityRules.from_settings(Settings()),
    )
    r = await api.post("/v1/audiences", json={"name": name(), "rule": plan}, headers=WRITE)
    audience = r.json()["id"]
    assert (await settled(api, audience))["size"] == 3
    path = f"/v1/audiences/{audience}/members"

    for headers in (READ, WRITE):  # sizes yes, members no
        assert (await api.get(path, headers=headers)).status_code == 403
        assert (await api.get(f"{path}.csv", headers=headers)).status_code == 403
    listed, cursor = [], None
    while True:
        r = await api.get(
            path, headers=MEMBERS, params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        )
        assert r.status_code == 200, r.text
        listed += r.json()["items"]
        cursor = r.json()["next"]
        if cursor is None:
            break
    assert len(listed) == 3 and len({m["profile_id"] for m in listed}) == 3
    assert {(m["identifiers"]["user_id"], m["identifiers"]["email"]) for m in listed} == set(people)
    assert all(set(m["identifiers"]) == {"user_id", "email"} for m in listed)
    assert all(datetime.fromisoformat(m["entered_at"]) <= datetime.now(UTC) for m in listed)
    assert (await api.get(path, headers=MEMBERS, params={"cursor": "x"})).status_code == 400
    assert (
        await api.get(f"/v1/audiences/{uuid.uuid4()}/members", headers=MEMBERS)
    ).status_code == 404

    r = await api.get(f"{path}.csv", headers=MEMBERS)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(r.text)))
    assert lines[0] == ["profile_id", "entered_at", *BUILT_IN]
    assert [line[0] for line in lines[1:]] == [m["profile_id"] for m in listed]
    assert {(line[2], line[3]) for line in lines[1:]} == set(people)

    async with api_client(engine, profiles_router, {}) as profiles_api:
        r = await profiles_api.get(f"/v1/profiles/user_id:{people[0][0]}/audiences", headers=READ)
    assert r.status_code == 200, r.text
    [membership] = r.json()
    [first] = [m for m in listed if m["identifiers"]["user_id"] == people[0][0]]
    assert (membership["id"], membership["entered_at"]) == (audience, first["entered_at"])


BULK = 50_000


@pytest.fixture(scope="module")
async def bulk(engine: AsyncEngine) -> AsyncIterator[tuple[str, str]]:
    """An audience of 50,000 members (user id, email, anonymous id each), written straight
    into Postgres; removed afterwards (the session's other tests back-fill every profile).
    Yields its id and the run's tag in the identifier values."""
    run = uid("bulk")
    async with engine.begin() as conn:
        audience_id = await audiences.create_audience(
            conn, f"bulk {run}", parse_rule({"trait": "plan", "eq": run})
        )
        assert audience_id is not None
        await conn.execute(
            text('UPDATE audiences SET backfill = \'{"status": "done"}\' WHERE id = :a'),
            {"a": audience_id},
        )
        await conn.execute(
            text(
                """
WITH p AS (SELECT n, gen_random_uuid() AS id FROM generate_series(1, :n) n),
made AS (INSERT INTO profiles (id) SELECT id FROM p),
ids AS (
  INSERT INTO identities (type, value, profile_id, claimed_by)
  SELECT t, t || '-' || :run || '-' || n || CASE t WHEN 'email' THEN '@example.com' ELSE '' END,
    id, id
  FROM p CROSS JOIN unnest(ARRAY['user_id', 'email', 'anonymous_id']) t
)
INSERT INTO audience_members (audience_id, profile_id) SELECT :a, id FROM p
"""
            ),
            {"n": BULK, "run": run, "a": audience_id},
        )
    async with engine.connect() as conn:  # statistics, as autovacuum keeps them in production
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
            text("ANALYZE profiles, identities, audience_members")
        )
    yield str(audience_id), run
    async with engine.begin() as conn:
        mine = "(SELECT profile_id FROM audience_members WHERE audience_id = :a)"
        await conn.execute(
            text(f"DELETE FROM identities WHERE profile_id IN {mine}"), {"a": audience_id}
        )
        await conn.execute(text(f"DELETE FROM profiles WHERE id IN {mine}"), {"a": audience_id})
        await audiences.delete_audience(conn, audience_id)


async def test_fifty_thousand_members_page_through(
    api: httpx.AsyncClient, bulk: tuple[str, str]
) -> None:
    audience, run = bulk
    seen, cursor = 0, None
    last = ""
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        r = await api.get(f"/v1/audiences/{audience}/members", headers=MEMBERS, params=params)
        assert r.status_code == 200, r.text
        for m in r.json()["items"]:
            assert m["profile_id"] > last  # in order, none twice
            last = m["profile_id"]
            n = m["identifiers"]["user_id"].rsplit("-", 1)[1]
            assert m["identifiers"]["email"] == f"email-{run}-{n}@example.com"
        seen += len(r.json()["items"])
        cursor = r.json()["next"]
        if cursor is None:
            break
    assert seen == BULK


# Memory the export may take above what it started with, whatever the audience's size:
# a few chunks of 1,000 members. The CSV of 50,000 members is ~8 MB, so an export that
# held it (or its rows) whole would be well over.
EXPORT_MEMORY_BOUND = 3 * 1024 * 1024


async def test_the_csv_export_of_fifty_thousand_members_streams_in_flat_memory(
    engine: AsyncEngine, bulk: tuple[str, str]
) -> None:
    """Driven through the ASGI interface directly (httpx's in-process transport would
    gather the whole body), each chunk checked and dropped as it arrives, while
    tracemalloc records the peak of what Python allocated on top of the start."""
    audience, run = bulk
    app = await api_app(engine, router, TOKENS)
    received = {"status": 0, "bytes": 0, "rows": 0, "chunks": 0, "last": ""}
    header: list[str] = []

    requested, done = False, asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()  # the client stays until the body has come
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            received["status"] = message["status"]
            return
        body = message.get("body", b"")
        if not message.get("more_body", False):
            done.set()
        received["bytes"] += len(body)
        received["chunks"] += 1 if body else 0
        lines = body.decode().splitlines()
        if not header:
            header.extend(lines.pop(0).split(","))
        if not lines:
            return
        received["rows"] += len(lines)
        for line in (lines[0], lines[-1]):  # spot checks: the whole body is not kept
            row = next(csv.reader([line]))
            assert row[0] > received["last"]
            received["last"] = row[0]
            n = row[2].rsplit("-", 1)[1]
            assert (row[3], row[5]) == (f"email-{run}-{n}@example.com", f"anonymous_id-{run}-{n}")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/audiences/{audience}/members.csv",
        "raw_path": f"/v1/audiences/{audience}/members.csv".encode(),
        "query_string": b"",
        "headers": [(b"host", b"cdp.test"), (b"authorization", f"Bearer {LISTER}".encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("cdp.test", 80),
        "root_path": "",
    }
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        await app(scope, receive, send)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert received["status"] == 200
    assert header == ["profile_id", "entered_at", *BUILT_IN]
    assert received["rows"] == BULK
    assert received["chunks"] > BULK // 1000  # streamed, not one body
    print(
        f"\nexport: {received['bytes']:,} bytes in {received['chunks']} chunks, "
        f"peak {peak / 2**20:.2f} MiB above the start"
    )
    assert received["bytes"] > 2 * EXPORT_MEMORY_BOUND  # the bound means something
    assert peak < EXPORT_MEMORY_BOUND
