"""The collector with its broker stopped: 503 with Retry-After and nothing accepted; after
the broker is back, it works again without a restart. Runs its own broker (another port)
so stopping it does not disturb the other tests. Once per Kafka producer library."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import httpx
import pytest

from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.base import next_offsets
from cdp_stream.settings import Settings
from tests.integration.conftest import WRITE_KEY
from tests.support import eventually, kafka_sh

PORT = int(os.environ.get("CDP_TEST_OUTAGE_KAFKA_PORT", "19092"))
BASIC = httpx.BasicAuth(WRITE_KEY, "")


async def kafka(command: str) -> None:
    await kafka_sh(command, PORT)


@pytest.fixture
async def own_broker(kafka_bootstrap: str) -> AsyncIterator[str]:
    await kafka("start")
    yield f"127.0.0.1:{PORT}"
    await kafka("stop")


@pytest.mark.parametrize("producer", ["aiokafka", "confluent"])
async def test_broker_down_means_503_and_nothing_accepted(
    own_broker: str, pg_url: str, producer: Literal["aiokafka", "confluent"]
) -> None:
    settings = Settings(
        kafka_bootstrap=own_broker,
        kafka_producer=producer,
        database_url=pg_url,
        bootstrap_write_key=WRITE_KEY,
        publish_timeout_s=3,
        retry_after_s=7,
    )
    runtime = await Runtime.start(settings, "outage-test")
    run = uuid.uuid4().hex[:10]
    transport = httpx.ASGITransport(app=create_app(runtime, ["collector"]))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:

            async def track(name: str) -> httpx.Response:
                body = {"userId": f"u-{run}", "event": "E", "messageId": f"{run}-{name}"}
                return await client.post("/v1/track", json=body, auth=BASIC)

            assert (await track("before")).status_code == 200

            await kafka("stop")
            started = time.monotonic()
            r = await track("during")
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "7"
            assert "nothing accepted" in r.json()["error"]
            assert time.monotonic() - started < 3 * 3  # bounded by the publish timeout
            batch = {"batch": [{"type": "track", "userId": "u", "event": "E"}] * 3}
            assert (await client.post("/v1/batch", json=batch, auth=BASIC)).status_code == 503
            assert (await client.get("/readyz")).status_code == 503

            await kafka("start")

            async def recovered() -> bool:
                return (await track("after")).status_code == 200

            assert await eventually(recovered, within_s=60, interval=0.5)
            assert (await client.get("/readyz")).status_code == 200

        # What the broker holds: the events answered 200, not the one answered 503.
        consumer = runtime.bus.consumer(f"outage-check-{run}", [runtime.settings.topics.events])
        await consumer.start()
        ids: set[str] = set()

        async def both_seen() -> bool:
            messages = await consumer.getmany(10_000, 500)
            await consumer.commit(next_offsets(messages))
            ids.update(m.value.decode() for m in messages)
            return sum(f'"{run}-' in v for v in ids) >= 2

        assert await eventually(both_seen, within_s=30)
        await asyncio.sleep(1)  # anything late would show up now
        ids.update(m.value.decode() for m in await consumer.getmany(10_000, 500))
        await consumer.stop()
        assert any(f'"{run}-before"' in v for v in ids)
        assert any(f'"{run}-after"' in v for v in ids)
        assert not any(f'"{run}-during"' in v for v in ids)
    finally:
        await runtime.stop()
