"""``/v1/crm/contacts`` on the real Postgres server, through an app of its own (the router
alone, as ``app.py`` will mount it) driven by httpx's ASGI transport."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.crm import feed as crm_feed
from cdp_stream.api.crm import router
from cdp_stream.settings import Settings
from tests.activation.crm.test_feed import ev, owner, resolve, track, uid
from tests.support import api_client, incoming

READ_TOKEN = "tok_crm_read_" + uuid.uuid4().hex
OTHER_TOKEN = "tok_crm_other_" + uuid.uuid4().hex  # no profiles:read
AUTH = {"authorization": f"Bearer {READ_TOKEN}"}
SETTINGS = Settings(crm_key_pages=["/pricing"])


@pytest.fixture(scope="module")
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(
        engine, router, {READ_TOKEN: ("profiles:read",), OTHER_TOKEN: ("audiences:write",)}
    ) as client:
        yield client


async def feed(engine: AsyncEngine, *events: dict[str, Any]) -> None:
    updates = await resolve(engine, *events)
    async with engine.begin() as conn:
        await crm_feed.apply_updates(conn, incoming(updates, SETTINGS), SETTINGS)


async def get(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    r = await api.get(path, headers=AUTH, params=params)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


async def test_contact_by_any_ref(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user, email = uid("u"), f"{uid('ada')}@example.com"
    await feed(
        engine,
        ev(
            "identify",
            "2024-03-01T10:00:00Z",
            userId=user,
            traits={"email": email, "first_name": "Ada", "company": "AE"},
        ),
    )
    pid = str(await owner(engine, "user_id", user))
    contact = await get(api, f"/v1/crm/contacts/{pid}")
    assert contact == {
        "profile_id": pid,
        "email": email,
        "phone": None,
        "user_id": user,
        "first_name": "Ada",
        "last_name": None,
        "company": "AE",
        "job_title": None,
        "lifecycle_stage": "subscriber",
        "first_touch_source": None,
        "last_activity_at": "2024-03-01T10:00:00Z",
        "created_at": contact["created_at"],
        "updated_at": contact["updated_at"],
    }
    for ref in (f"user_id:{user}", f"email:{email.upper()}"):
        assert await get(api, f"/v1/crm/contacts/{ref}") == contact


async def test_merged_away_id_finds_the_canonical_contact(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    anon, email = uid("a"), f"{uid('m')}@example.com"
    await feed(engine, ev("page", "2024-03-01T10:00:00Z", anonymousId=anon))
    await feed(engine, ev("identify", "2024-03-02T10:00:00Z", traits={"email": email}))
    gone = await owner(engine, "email", email)
    await feed(
        engine, ev("identify", "2024-03-03T10:00:00Z", anonymousId=anon, traits={"email": email})
    )
    kept = await owner(engine, "email", email)
    assert kept != gone
    assert (await get(api, f"/v1/crm/contacts/{gone}"))["profile_id"] == str(kept)


async def test_interactions_newest_first_in_pages(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = uid("u")
    events = [ev("identify", "2024-03-01T09:00:00Z", userId=user)]
    events += [
        track("Email Opened", f"2024-03-01T10:0{n}:00Z", userId=user, properties={"email_id": n})
        for n in range(5)
    ]
    events.append(ev("page", "2024-03-01T11:00:00Z", userId=user, properties={"path": "/pricing"}))
    events.append(ev("page", "2024-03-01T11:01:00Z", userId=user, properties={"path": "/about"}))
    await feed(engine, *events)
    ref = f"user_id:{user}"
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        page = await get(
            api,
            f"/v1/crm/contacts/{ref}/interactions",
            limit=2,
            **({"cursor": cursor} if cursor else {}),
        )
        pages += 1
        assert len(page["items"]) <= 2
        items += page["items"]
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 3
    assert [i["kind"] for i in items] == ["page_viewed"] + ["email_opened"] * 5
    newest_first = [events[6], *events[5:0:-1]]
    assert [i["message_id"] for i in items] == [e["messageId"] for e in newest_first]
    assert items[1]["details"] == {"email_id": 4}
    everything = await get(api, f"/v1/crm/contacts/{ref}/interactions")
    assert everything == {"items": items, "next": None}


async def test_profile_without_contact_is_404(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    anon = uid("a")
    await feed(
        engine,
        ev("page", "2024-03-01T10:00:00Z", anonymousId=anon, properties={"path": "/pricing"}),
    )
    for ref in (f"anonymous_id:{anon}", str(uuid.uuid4()), "email:nobody@example.com", "junk"):
        for path in ("", "/interactions"):
            r = await api.get(f"/v1/crm/contacts/{ref}{path}", headers=AUTH)
            assert r.status_code == 404, (ref, path, r.text)


@pytest.mark.parametrize("cursor", ["nope", "MjAyNC0wMS0wMXwtMQ==", "fHw="])
async def test_invalid_cursor_is_400(
    api: httpx.AsyncClient, engine: AsyncEngine, cursor: str
) -> None:
    user = uid("u")
    await feed(engine, ev("identify", "2024-03-01T09:00:00Z", userId=user))
    r = await api.get(
        f"/v1/crm/contacts/user_id:{user}/interactions", headers=AUTH, params={"cursor": cursor}
    )
    assert r.status_code == 400, r.text


async def test_token_and_scope_are_required(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = uid("u")
    await feed(engine, ev("identify", "2024-03-01T09:00:00Z", userId=user))
    for path in (
        f"/v1/crm/contacts/user_id:{user}",
        f"/v1/crm/contacts/user_id:{user}/interactions",
    ):
        assert (await api.get(path)).status_code == 401
        r = await api.get(path, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await api.get(path, headers={"authorization": f"Bearer {OTHER_TOKEN}"})
        assert r.status_code == 403
