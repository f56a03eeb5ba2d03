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
