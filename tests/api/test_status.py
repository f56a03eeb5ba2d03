"""``GET /v1/status`` on the real pipeline with the Postgres bus (``cdp-stream up``'s
default): events stored and rejected in the last hour, consumer lag, dead letters."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cdp_stream.app import Runtime, create_app
from cdp_stream.profiles import dead_letters
from cdp_stream.resolver.consumer import run_resolver
from tests.support import eventually, running_pipeline, uid

WRITE_KEY = "wk_status_" + uuid.uuid4().hex[:8]
API_TOKEN = "tok_status_" + uuid.uuid4().hex[:8]
AUTH = {"authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
async def runtime(pg_url: str) -> AsyncIterator[Runtime]:
    async with running_pipeline(
        None,  # type: ignore[arg-type]  # the Postgres bus
        pg_url,
        write_key=WRITE_KEY,
        api_token=API_TOKEN,
        loops=[run_resolver],
    ) as rt:
        yield rt


@pytest.fixture(scope="module")
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client


async def test_status_counts_what_happened(http: httpx.AsyncClient, runtime: Runtime) -> None:
    good = {"type": "track", "event": "Signed In", "userId": uid("u")}
    bad = {"type": "track", "userId": uid("u"), "messageId": uid("bad")}  # no event name
    r = await http.post("/v1/batch", json={"batch": [good, bad]}, auth=(WRITE_KEY, ""))
    assert r.status_code == 200 and len(r.json()["rejected"]) == 1
    reason = r.json()["rejected"][0]["reason"]
    async with runtime.engine.begin() as conn:
        await dead_letters.record(conn, "resolver", "cdp.events/3@17", "a value Postgres refused")

    topics = runtime.settings.topics
    resolver = (topics.resolver_group, topics.events)

    async def status() -> dict[str, Any] | None:
        r = await http.get("/v1/status", headers=AUTH)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        lag = {(x["group"], x["topic"]) for x in body["lag"]}
        return body if body["accepted_last_hour"] >= 1 and resolver in lag else None

    body = await eventually(status)
    assert body, "the event was never stored"
    assert body["rejected_last_hour"] == 1
    [rejection] = body["rejections"]
    assert (rejection["messageId"], rejection["reason"]) == (bad["messageId"], reason)
    assert rejection["sourceId"].startswith("src_")
    assert body["dead_letters"]["resolver"] >= 1
    assert body["recent_dead_letters"][0]["origin"] == "cdp.events/3@17"
    assert body["recent_dead_letters"][0]["reason"] == "a value Postgres refused"
    assert all(x["lag"] >= 0 for x in body["lag"])
    assert (await http.get("/v1/status")).status_code == 401


async def test_with_kafka_the_broker_holds_rejections_and_lag(
    kafka_bootstrap: str, pg_url: str
) -> None:
    async with running_pipeline(kafka_bootstrap, pg_url, write_key=WRITE_KEY,
                                api_token=API_TOKEN, loops=[]) as rt:  # fmt: skip
        transport = httpx.ASGITransport(app=create_app(rt, ["api"]))
        async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as http:
            r = await http.get("/v1/status", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["rejected_last_hour"], body["rejections"], body["lag"]) == (None, None, None)
    assert body["accepted_last_hour"] >= 0
