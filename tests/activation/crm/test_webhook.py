"""The CRM webhook (:mod:`cdp_stream.activation.crm.webhook`): signing, retries, the
dead-letter and redrive, against a real HTTP receiver on a local port and the real
Postgres server.

The deliveries table is shared by the session and the worker sends every due row, so the
receiver fails only the requests of the test that asks it to, and each test checks only
its own rows (other rows are simply delivered).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.crm import feed as crm_feed
from cdp_stream.activation.crm import webhook
from cdp_stream.profiles.models import crm_webhook_deliveries
from cdp_stream.settings import Settings
from tests.activation.crm.test_feed import ev, owner, resolve, track, uid
from tests.support import eventually, incoming

SECRET = "whsec-" + uuid.uuid4().hex
BASE_DELAY = 0.1  # seconds: the first retry waits this, the second twice as long


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server: one request per connection, answered by ``status``."""

    status: Callable[[Received], int] = lambda _: 200
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            assert lines[0].startswith("POST /hook "), lines[0]
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Received(time.monotonic(), headers, body)
            self.requests.append(request)
            code = self.status(request)
            writer.write(
                f"HTTP/1.1 {code} Status\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
                "Connection: close\r\n\r\nbody".encode()
            )
            await writer.drain()
        finally:
            writer.close()

    def about(self, marker: str) -> list[Received]:
        return [r for r in self.requests if marker.encode() in r.body]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    server = await asyncio.start_server(rx.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rx.url = f"http://127.0.0.1:{port}/hook"
    async with server:
        yield rx


def settings_for(url: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "crm_webhook_url": url,
        "crm_webhook_secret": SECRET,
        "crm_webhook_max_attempts": 3,
        "crm_key_pages": ["/pricing"],
    }
    return Settings(**(values | overrides))


@asynccontextmanager
async def worker(engine: AsyncEngine, settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    """``run_deliveries`` as the activation process runs it, with test-sized delays."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        webhook.run_deliveries(
            engine, settings, stop, base_delay_s=BASE_DELAY, poll_interval_s=0.02, timeout_s=2.0
        )
    )
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def enqueue(engine: AsyncEngine, marker: str) -> int:
    async with engine.begin() as conn:
        row = await conn.execute(
            insert(crm_webhook_deliveries)
            .values(kind="contact", payload={"type": "test", "profile_id": marker, "n": 1})
            .returning(crm_webhook_deliveries.c.id)
        )
        return int(row.scalar_one())


async def delivery(engine: AsyncEngine, delivery_id: int) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = await conn.execute(
            select(crm_webhook_deliveries).where(crm_webhook_deliveries.c.id == delivery_id)
        )
        return dict(row.one()._mapping)


async def settled(engine: AsyncEngine, delivery_id: int, status: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        row = await delivery(engine, delivery_id)
        return row if row["status"] == status else None

    found = await eventually(probe, within_s=15)
    assert found, (status, await delivery(engine, delivery_id))
    return dict(found)


# --- pure ---------------------------------------------------------------------------------


def test_signature_scheme() -> None:
    body, ts = b'{"a":1}', 1_700_000_000
    expected = hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert webhook.sign("k", ts, body) == f"sha256={expected}"
    sig = webhook.sign("k", ts, body)
    assert webhook.verify("k", str(ts), body, sig, now=ts + 10)
    assert not webhook.verify("k", ts, b'{"a":2}', sig, now=ts)  # tampered body
    assert not webhook.verify("other", ts, body, sig, now=ts)  # wrong secret
    assert not webhook.verify("k", ts + 1, body, sig, now=ts)  # the timestamp is signed
    assert not webhook.verify("k", ts, body, sig, now=ts + 301)  # a replay, too late
    assert not webhook.verify("k", "yesterday", body, sig, now=ts)
    assert not webhook.verify("k", ts, body, "sha256=" + "0" * 64, now=ts)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [webhook.backoff_s(n, 5) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert webhook.backoff_s(40, 5) == webhook.MAX_BACKOFF_S


# --- delivery -----------------------------------------------------------------------------


async def test_signed_body_verifies(engine: AsyncEngine, receiver: Receiver) -> None:
    marker = uid("sig")
    delivery_id = await enqueue(engine, marker)
    async with worker(engine, settings_for(receiver.url)):
        row = await settled(engine, delivery_id, "delivered")
    assert row["attempts"] == 1 and row["delivered_at"] is not None and row["last_error"] is None
    [request] = receiver.about(marker)
    h = request.headers
    assert h["content-type"] == "application/json"
    assert h["x-cdp-delivery"] == str(delivery_id) and h["x-cdp-kind"] == "contact"
    assert abs(int(h["x-cdp-timestamp"]) - time.time()) < 60
    assert webhook.verify(SECRET, h["x-cdp-timestamp"], request.body, h["x-cdp-signature"])
    assert not webhook.verify("wrong", h["x-cdp-timestamp"], request.body, h["x-cdp-signature"])
    assert request.payload == {"type": "test", "profile_id": marker, "n": 1}


async def test_receiver_failing_twice_gets_it_on_the_third_attempt(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    marker = uid("flaky")
    answers = iter([500, 503, 200])
    receiver.status = lambda r: next(answers) if marker.encode() in r.body else 200
    delivery_id = await enqueue(engine, marker)
    async with worker(engine, settings_for(receiver.url)):
        row = await settled(engine, delivery_id, "delivered")
    assert row["attempts"] == 3 and row["last_error"] is None
    tries = receiver.about(marker)
    assert len(tries) == 3
    assert len({r.headers["x-cdp-delivery"] for r in tries}) == 1  # one delivery, retried
    gaps = [b.at - a.at for a, b in itertools.pairwise(tries)]
    assert gaps[0] >= BASE_DELAY * 0.9 and gaps[1] >= 2 * BASE_DELAY * 0.9  # backed off


async def test_always_failing_goes_dead_and_redrive_delivers_it(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    marker = uid("dead")
    broken = True
    receiver.status = lambda r: 500 if broken and marker.encode() in r.body else 200
    delivery_id = await enqueue(engine, marker)
    settings = settings_for(receiver.url)
    async with worker(engine, settings):
        row = await settled(engine, delivery_id, "dead")
        await asyncio.sleep(4 * BASE_DELAY)  # a dead delivery is not tried again
    assert row["attempts"] == settings.crm_webhook_max_attempts == 3
    assert row["last_error"].startswith("HTTP 500")
    assert len(receiver.about(marker)) == 3

    assert await webhook.redrive(engine) >= 1
    row = await delivery(engine, delivery_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    broken = False
    async with worker(engine, settings):
        row = await settled(engine, delivery_id, "delivered")
    assert row["attempts"] == 1
    assert len(receiver.about(marker)) == 4
    assert await webhook.redrive(engine) == 0  # nothing dead is left


async def test_unreachable_receiver_is_a_failed_attempt(engine: AsyncEngine) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens there now
    marker = uid("down")
    delivery_id = await enqueue(engine, marker)
    # Other tests' rows would fail here too: they are redriven by the tests that follow.
    async with worker(engine, settings_for(f"http://127.0.0.1:{port}/hook")):
        row = await settled(engine, delivery_id, "dead")
    assert row["attempts"] == 3 and "ConnectError" in row["last_error"]
    await webhook.redrive(engine)


async def test_without_a_url_the_worker_only_waits(engine: AsyncEngine) -> None:
    delivery_id = await enqueue(engine, uid("idle"))
    stop = asyncio.Event()
    task = asyncio.create_task(webhook.run_deliveries(engine, settings_for(None), stop))
    await asyncio.sleep(0.2)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 1)
    row = await delivery(engine, delivery_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)


async def test_two_workers_send_each_delivery_once(engine: AsyncEngine, receiver: Receiver) -> None:
    marker = uid("pair")
    ids = [await enqueue(engine, f"{marker}-{n}") for n in range(30)]
    settings = settings_for(receiver.url)
    async with worker(engine, settings), worker(engine, settings):
        for delivery_id in ids:
            await settled(engine, delivery_id, "delivered")
    sent = [r.headers["x-cdp-delivery"] for r in receiver.about(marker)]
    assert sorted(sent) == sorted(str(i) for i in ids)  # every one, none twice


async def test_crm_feed_to_receiver(engine: AsyncEngine, receiver: Receiver) -> None:
    """The whole path: resolver -> CRM feed -> queue -> signed POSTs."""
    email = f"{uid('feed')}@example.com"
    settings = settings_for(receiver.url)
    updates = await resolve(
        engine,
        ev("identify", "2024-03-01T10:00:00Z", traits={"email": email, "firstName": "Kay"}),
        track("Form Submitted", "2024-03-01T10:01:00Z", context={"traits": {"email": email}}),
    )
    async with engine.begin() as conn:
        await crm_feed.apply_updates(conn, incoming(updates, settings), settings)
    pid = str(await owner(engine, "email", email))

    async def all_sent() -> bool:
        return len(receiver.about(pid)) >= 2

    async with worker(engine, settings):
        assert await eventually(all_sent, within_s=15)
    contact, interaction = (r.payload for r in receiver.about(pid))
    assert contact["type"] == "contact.upserted" and contact["profile_id"] == pid
    assert contact["contact"]["email"] == email
    assert contact["contact"]["first_name"] == "Kay"
    assert contact["contact"]["lifecycle_stage"] == "lead"
    assert interaction["type"] == "interaction.created"
    assert interaction["interaction"]["kind"] == "form_submitted"
    assert interaction["interaction"]["message_id"] == updates[0]["events"][1]["messageId"]
    for r in receiver.about(pid):
        h = r.headers
        assert webhook.verify(SECRET, h["x-cdp-timestamp"], r.body, h["x-cdp-signature"])


async def test_delivered_rows_are_pruned_after_the_retention(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    old, recent, dead = [await enqueue(engine, uid("prune")) for _ in range(3)]
    async with engine.begin() as conn:
        table = crm_webhook_deliveries
        for row_id, status, age in (
            (old, "delivered", 8),
            (recent, "delivered", 6),
            (dead, "dead", 30),
        ):
            await conn.execute(
                table.update()
                .where(table.c.id == row_id)
                .values(status=status, delivered_at=text(f"now() - interval '{age} days'"))
            )
    async with worker(engine, settings_for(receiver.url, crm_webhook_keep_delivered_days=7)):

        async def gone() -> bool:
            async with engine.connect() as conn:
                ids = select(table.c.id).where(table.c.id.in_([old, recent, dead]))
                return set((await conn.execute(ids)).scalars()) == {recent, dead}

        assert await eventually(gone)
