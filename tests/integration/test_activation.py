"""collector -> Kafka -> resolver -> cdp.profile-updates -> activation -> CRM and audiences,
on the real broker and server."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.integration.conftest import AUTH, WRITE_KEY
from tests.support import eventually

BASIC = httpx.BasicAuth(WRITE_KEY, "")


async def test_events_become_a_contact_interactions_and_audience_membership(
    client: httpx.AsyncClient, profile_of: Any
) -> None:
    run = uuid.uuid4().hex[:10]
    user, anon, email = f"u-{run}", f"a-{run}", f"crm-{run}@example.com"
    rule = {
        "and": [
            {
                "event": {
                    "type": "page",
                    "where": {"path": {"starts_with": "/pricing"}},
                    "within": "7d",
                }
            },
            {"computed": "order_count", "eq": 0},
            {"trait": "email", "eq": email},  # only this test's person: the database is shared
        ]
    }
    r = await client.post(
        "/v1/audiences", json={"name": f"pricing-no-order-{run}", "rule": rule}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    audience = r.json()["id"]

    async def size() -> int:
        got = await client.get(f"/v1/audiences/{audience}", headers=AUTH)
        return int(got.json()["size"])

    page = {
        "anonymousId": anon,
        "name": "Pricing",
        "context": {"page": {"path": "/pricing", "url": "https://shop.example/pricing"}},
    }
    assert (await client.post("/v1/page", json=page, auth=BASIC)).status_code == 200
    identify = {
        "userId": user,
        "anonymousId": anon,
        "traits": {"email": email, "firstName": "Ada", "lastName": "Lovelace"},
    }
    assert (await client.post("/v1/identify", json=identify, auth=BASIC)).status_code == 200
    assert await eventually(lambda: _equals(size, 1), within_s=30)

    async def contact() -> dict[str, Any] | None:
        got = await client.get(f"/v1/crm/contacts/email:{email}", headers=AUTH)
        return got.json() if got.status_code == 200 else None

    found = await eventually(contact, within_s=30)
    assert found is not None
    assert (found["email"], found["first_name"], found["last_name"]) == (email, "Ada", "Lovelace")
    assert found["lifecycle_stage"] == "subscriber"

    order = {
        "userId": user,
        "event": "Order Completed",
        "messageId": f"order-{run}",
        "properties": {"order_id": f"o-{run}", "revenue": 42.5, "currency": "EUR"},
    }
    assert (await client.post("/v1/track", json=order, auth=BASIC)).status_code == 200

    async def customer() -> dict[str, Any] | None:
        c = await contact()
        return c if c and c["lifecycle_stage"] == "customer" else None

    assert await eventually(customer, within_s=30)
    assert await eventually(lambda: _equals(size, 0), within_s=30)  # ordered: left it
    got = await client.get(f"/v1/crm/contacts/user_id:{user}/interactions", headers=AUTH)
    kinds = [i["kind"] for i in got.json()["items"]]
    assert kinds[0].startswith("order") and len(kinds) == 2, kinds  # the order, the key page


async def _equals(probe: Any, expected: int) -> bool:
    return bool(await probe() == expected)


# --- an unmerge reaches activation (issue 16's reproductions) ----------------------------

UNMERGE_WITHIN_S = 3.0  # "a second or two" on a shared 2-core machine


async def _send(client: httpx.AsyncClient, call: str, **body: Any) -> None:
    r = await client.post(f"/v1/{call}", json=body, auth=BASIC)
    assert r.status_code == 200, r.text


async def _unmerge(client: httpx.AsyncClient, ref: str) -> None:
    r = await client.post(f"/v1/profiles/{ref}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text


async def test_audiences_follow_an_unmerge(client: httpx.AsyncClient, profile_of: Any) -> None:
    """Three page views on x1, two on x2, both signed in as u: the merged profile (5) is in
    "page_views >= 5"; after the unmerge x1's (3) is not, x2's (2) is in "== 2"."""
    run = uuid.uuid4().hex[:10]
    user, x1, x2, path = f"u-{run}", f"x1-{run}", f"x2-{run}", f"/unmerge/{run}"
    this_test = {"event": {"type": "page", "where": {"path": {"eq": path}}, "within": "7d"}}
    sizes = []
    for name, condition in (("gte5", {"gte": 5}), ("eq2", {"eq": 2})):
        rule = {"and": [{"computed": "page_views", **condition}, this_test]}
        r = await client.post(
            "/v1/audiences", json={"name": f"{name}-{run}", "rule": rule}, headers=AUTH
        )
        assert r.status_code == 201, r.text
        sizes.append(r.json()["id"])

    async def both() -> tuple[int, ...]:
        got = [await client.get(f"/v1/audiences/{a}", headers=AUTH) for a in sizes]
        return tuple(int(g.json()["size"]) for g in got)

    for anon, views in ((x1, 3), (x2, 2)):
        for _ in range(views):
            await _send(client, "page", anonymousId=anon, context={"page": {"path": path}})
    await profile_of(f"anonymous_id:{x2}", lambda p: p["computed"].get("page_views") == 2)
    await _send(client, "identify", userId=user, anonymousId=x1)
    await profile_of(f"anonymous_id:{x1}", lambda p: len(p["identities"]) == 2)
    await _send(client, "identify", userId=user, anonymousId=x2)
    assert await eventually(lambda: _is(both, (1, 0)), within_s=30)

    await _unmerge(client, f"user_id:{user}")
    assert await eventually(lambda: _is(both, (0, 1)), within_s=UNMERGE_WITHIN_S)


async def test_the_crm_follows_an_unmerge(client: httpx.AsyncClient, profile_of: Any) -> None:
    """identify(u, x1); identify(x2, m@); identify(u, x2): one contact with u and m@. After
    the unmerge, u's contact has no email and x2's profile has its own contact with m@."""
    run = uuid.uuid4().hex[:10]
    user, x1, x2, email = f"u-{run}", f"x1-{run}", f"x2-{run}", f"m-{run}@example.com"

    async def contact(ref: str) -> dict[str, Any] | None:
        got = await client.get(f"/v1/crm/contacts/{ref}", headers=AUTH)
        return dict(got.json()) if got.status_code == 200 else None

    await _send(client, "identify", userId=user, anonymousId=x1)
    await profile_of(f"user_id:{user}")
    await _send(client, "identify", anonymousId=x2, traits={"email": email})
    await profile_of(f"email:{email}")
    await _send(client, "identify", userId=user, anonymousId=x2)

    async def merged() -> bool:
        found = await contact(f"user_id:{user}")
        return found is not None and found["email"] == email

    assert await eventually(merged, within_s=30)
    await _unmerge(client, f"user_id:{user}")

    async def split() -> bool:
        mine, theirs = await contact(f"user_id:{user}"), await contact(f"anonymous_id:{x2}")
        return (
            mine is not None
            and mine["email"] is None
            and theirs is not None
            and (theirs["email"], theirs["user_id"]) == (email, None)
        )

    assert await eventually(split, within_s=UNMERGE_WITHIN_S)


async def _is(probe: Any, expected: Any) -> bool:
    return bool(await probe() == expected)
