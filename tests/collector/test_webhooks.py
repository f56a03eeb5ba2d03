"""SendGrid and Mailgun event webhooks, through the app on a memory bus and real Postgres.

Payloads follow the providers' public docs (SendGrid "Event Webhook Reference", Mailgun
"Webhooks" / "Securing Webhooks"); the SendGrid key pair is generated here and the body
signed the way SendGrid does (ECDSA P-256/SHA-256 over timestamp + body, base64 DER).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cdp_stream.app import Runtime, create_app
from cdp_stream.collector.webhooks import SeenTokens
from cdp_stream.settings import Settings

PRIVATE = ec.generate_private_key(ec.SECP256R1())
PUBLIC_B64 = base64.b64encode(
    PRIVATE.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()
MAILGUN_KEY = "key-" + uuid.uuid4().hex
WRITE_KEY = "wk_hooks_" + uuid.uuid4().hex


@pytest.fixture(scope="module")
async def runtime(pg_url: str) -> AsyncIterator[Runtime]:
    settings = Settings(
        database_url=pg_url,
        kafka_bootstrap=None,
        bootstrap_write_key=WRITE_KEY,
        sendgrid_verification_key=PUBLIC_B64,
        mailgun_signing_key=MAILGUN_KEY,
        topic_namespace=f"hooks{uuid.uuid4().hex[:6]}.",
    )
    rt = await Runtime.start(settings, "test")
    yield rt
    await rt.stop()


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime, ["collector"]))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as c:
        yield c


async def drain(runtime: Runtime, topic: str) -> list[dict[str, Any]]:
    """Every record on ``topic`` not yet read by this module's reader of it."""
    consumer = runtime.bus.consumer(f"reader-{topic}", [topic])
    await consumer.start()
    try:
        out: list[dict[str, Any]] = []
        while batch := await consumer.getmany(1000, 200):
            out += [json.loads(m.value) for m in batch]
            offsets: dict[tuple[str, int], int] = {}
            for m in batch:
                offsets[(m.topic, m.partition)] = m.offset + 1
            await consumer.commit(offsets)
        return out
    finally:
        await consumer.stop()


async def published(runtime: Runtime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    topics = runtime.settings.topics
    return await drain(runtime, topics.events), await drain(runtime, topics.rejected)


# --- SendGrid ------------------------------------------------------------------------------


def sendgrid_headers(body: bytes, timestamp: str | None = None) -> dict[str, str]:
    ts = timestamp or str(int(time.time()))
    signature = PRIVATE.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "content-type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": ts,
    }


def sendgrid_payload(email: str) -> list[dict[str, Any]]:
    """The shapes of SendGrid's Event Webhook Reference."""
    base = {"email": email, "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>"}
    msg = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"
    return [
        {**base, "timestamp": 1513299569, "event": "processed",
         "sg_event_id": "sg_p_" + uuid.uuid4().hex, "sg_message_id": msg},
        {**base, "timestamp": 1513299570, "event": "delivered", "response": "250 OK",
         "sg_event_id": "sg_d_" + uuid.uuid4().hex, "sg_message_id": msg},
        {**base, "timestamp": 1513299571, "event": "open", "ip": "255.255.255.255",
         "useragent": "Mozilla/5.0", "sg_event_id": "sg_o_" + uuid.uuid4().hex,
         "sg_message_id": msg, "sg_machine_open": False},
        {**base, "timestamp": 1513299572, "event": "click", "url": "https://example.com/x",
         "url_offset": {"index": 0, "type": "html"}, "ip": "255.255.255.255",
         "useragent": "Mozilla/5.0", "sg_event_id": "sg_c_" + uuid.uuid4().hex,
         "sg_message_id": msg},
        {**base, "timestamp": 1513299573, "event": "bounce", "type": "bounce",
         "reason": "500 unknown recipient", "status": "5.0.0",
         "sg_event_id": "sg_b_" + uuid.uuid4().hex, "sg_message_id": msg},
        {**base, "timestamp": 1513299574, "event": "spamreport",
         "sg_event_id": "sg_s_" + uuid.uuid4().hex, "sg_message_id": msg},
        {**base, "timestamp": 1513299575, "event": "group_unsubscribe", "asm_group_id": 10,
         "sg_event_id": "sg_g_" + uuid.uuid4().hex, "sg_message_id": msg},
        {**base, "timestamp": 1513299576, "event": "teleported",
         "sg_event_id": "sg_x_" + uuid.uuid4().hex},
    ]  # fmt: skip


async def test_sendgrid_events_become_segment_email_events(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await published(runtime)
    email = f"Someone.{uuid.uuid4().hex[:6]}@Example.com"
    payload = sendgrid_payload(email)
    body = json.dumps(payload).encode()
    r = await client.post(
        f"/v1/webhooks/sendgrid/{WRITE_KEY}", content=body, headers=sendgrid_headers(body)
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 6
    assert [x["index"] for x in r.json()["rejected"]] == [0, 7]
    events, rejected = await published(runtime)
    by_id = {e["messageId"]: e for e in events}
    assert set(by_id) == {p["sg_event_id"] for p in payload[1:7]}
    names = [by_id[p["sg_event_id"]]["event"] for p in payload[1:7]]
    assert names == [
        "Email Delivered",
        "Email Opened",
        "Email Link Clicked",
        "Email Bounced",
        "Email Marked as Spam",
        "Unsubscribed",
    ]
    anon = "email-sha256:" + hashlib.sha256(email.lower().encode()).hexdigest()
    for e in events:
        assert e["type"] == "track"
        assert e["channel"] == "email"
        assert e["context"]["traits"] == {"email": email}
        assert e["anonymousId"] == anon
        assert "userId" not in e
    click = by_id[payload[3]["sg_event_id"]]
    assert click["properties"]["link_url"] == "https://example.com/x"
    assert click["properties"]["sendgrid"]["url_offset"] == {"index": 0, "type": "html"}
    assert click["context"]["ip"] == "255.255.255.255"  # the reader's, not SendGrid's
    assert click["timestamp"] == "2017-12-15T00:59:32.000000Z"
    assert [x["reason"] for x in rejected] == [
        "SendGrid event 'processed' has no Segment spec counterpart",
        "unknown SendGrid event type 'teleported'",
    ]
    assert rejected[1]["event"] == payload[7]
    assert rejected[1]["endpoint"] == "webhooks/sendgrid"


async def test_sendgrid_retry_keeps_the_message_id(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await published(runtime)
    payload = [sendgrid_payload(f"r{uuid.uuid4().hex[:6]}@example.com")[1]]
    body = json.dumps(payload).encode()
    for _ in range(2):
        r = await client.post(
            f"/v1/webhooks/sendgrid/{WRITE_KEY}", content=body, headers=sendgrid_headers(body)
        )
        assert r.status_code == 200, r.text
    events, _ = await published(runtime)
    assert [e["messageId"] for e in events] == [payload[0]["sg_event_id"]] * 2


async def test_sendgrid_bad_signature_publishes_nothing(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await published(runtime)
    body = json.dumps(sendgrid_payload("x@example.com")).encode()
    headers = sendgrid_headers(body)
    tampered = body.replace(b"x@example.com", b"y@example.com")
    r = await client.post(f"/v1/webhooks/sendgrid/{WRITE_KEY}", content=tampered, headers=headers)
    assert r.status_code == 403
    other_ts = {**headers, "X-Twilio-Email-Event-Webhook-Timestamp": "1"}
    r = await client.post(f"/v1/webhooks/sendgrid/{WRITE_KEY}", content=body, headers=other_ts)
    assert r.status_code == 403
    r = await client.post(f"/v1/webhooks/sendgrid/{WRITE_KEY}", content=body)
    assert r.status_code == 403
    garbage = {**headers, "X-Twilio-Email-Event-Webhook-Signature": "not base64!"}
    r = await client.post(f"/v1/webhooks/sendgrid/{WRITE_KEY}", content=body, headers=garbage)
    assert r.status_code == 403
    assert await published(runtime) == ([], [])


async def test_sendgrid_unknown_source(runtime: Runtime, client: httpx.AsyncClient) -> None:
    await published(runtime)
    body = json.dumps(sendgrid_payload("x@example.com")).encode()
    r = await client.post(
        "/v1/webhooks/sendgrid/wk_nobody", content=body, headers=sendgrid_headers(body)
    )
    assert r.status_code == 401
    assert await published(runtime) == ([], [])


# --- Mailgun ---------------------------------------------------------------------------------


def mailgun_body(
    event_data: dict[str, Any], *, timestamp: int | None = None, key: str = MAILGUN_KEY
) -> dict[str, Any]:
    ts = str(timestamp if timestamp is not None else int(time.time()))
    token = uuid.uuid4().hex + uuid.uuid4().hex[:18]
    signature = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": ts, "token": token, "signature": signature},
        "event-data": event_data,
    }


def mailgun_event(event: str, recipient: str, **extra: Any) -> dict[str, Any]:
    """The shape of Mailgun's documented event-data."""
    return {
        "id": uuid.uuid4().hex[:22],
        "timestamp": 1521472262.908181,
        "log-level": "info",
        "event": event,
        "recipient": recipient,
        "recipient-domain": "example.com",
        "tags": ["my_tag_1"],
        "user-variables": {"my_var_1": "Mailgun Variable #1"},
        "message": {
            "headers": {
                "to": recipient,
                "message-id": "20130503182626.18666.16540@example.com",
                "from": "Bob <bob@example.com>",
                "subject": "Test delivered webhook",
            },
            "attachments": [],
            "size": 111,
        },
        **extra,
    }


async def test_mailgun_events_become_segment_email_events(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await published(runtime)
    email = f"alice.{uuid.uuid4().hex[:6]}@example.com"
    cases = [
        (mailgun_event("delivered", email), "Email Delivered"),
        (mailgun_event("opened", email, ip="50.56.129.169"), "Email Opened"),
        (mailgun_event("clicked", email, url="https://example.com/a"), "Email Link Clicked"),
        (
            mailgun_event(
                "failed",
                email,
                severity="permanent",
                reason="bounce",
                **{"delivery-status": {"code": 550, "message": "No such user"}},
            ),
            "Email Bounced",
        ),
        (mailgun_event("complained", email), "Email Marked as Spam"),
        (mailgun_event("unsubscribed", email), "Unsubscribed"),
    ]
    for data, _ in cases:
        r = await client.post(f"/v1/webhooks/mailgun/{WRITE_KEY}", json=mailgun_body(data))
        assert r.status_code == 200, r.text
    events, rejected = await published(runtime)
    assert rejected == []
    assert [(e["messageId"], e["event"]) for e in events] == [
        (data["id"], name) for data, name in cases
    ]
    for e in events:
        assert e["context"]["traits"] == {"email": email}
        assert e["anonymousId"] == "email-sha256:" + hashlib.sha256(email.encode()).hexdigest()
        assert e["properties"]["email_subject"] == "Test delivered webhook"
        assert e["timestamp"] == "2018-03-19T15:11:02.908181Z"
    assert events[2]["properties"]["link_url"] == "https://example.com/a"
    assert events[3]["properties"]["reason"] == "No such user"


async def test_mailgun_temporary_failure_and_unknown_are_rejected_with_reason(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await published(runtime)
    temporary = mailgun_event("failed", "t@example.com", severity="temporary")
    unknown = mailgun_event("levitated", "t@example.com")
    for data in (temporary, unknown):
        r = await client.post(f"/v1/webhooks/mailgun/{WRITE_KEY}", json=mailgun_body(data))
        assert r.status_code == 200, r.text
    events, rejected = await published(runtime)
    assert events == []
    assert [x["reason"] for x in rejected] == [
        "Mailgun failure of severity 'temporary' is not a bounce",
        "unknown Mailgun event type 'levitated'",
    ]
    assert rejected[0]["event"] == temporary


async def test_mailgun_redelivery_dedupes_by_message_id(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    """The provider's retry of one event (newly signed) carries the same messageId."""
    await published(runtime)
    data = mailgun_event("delivered", "d@example.com")
    for _ in range(2):
        r = await client.post(f"/v1/webhooks/mailgun/{WRITE_KEY}", json=mailgun_body(data))
        assert r.status_code == 200, r.text
    events, _ = await published(runtime)
    assert [e["messageId"] for e in events] == [data["id"]] * 2


async def test_mailgun_refusals_publish_nothing(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await published(runtime)
    data = mailgun_event("delivered", "z@example.com")
    url = f"/v1/webhooks/mailgun/{WRITE_KEY}"

    body = mailgun_body(data)
    assert (await client.post(url, json=body)).status_code == 200
    replay = await client.post(url, json=body)
    assert replay.status_code == 403
    assert "replayed" in replay.json()["error"]

    stale = mailgun_body(data, timestamp=int(time.time()) - 301)
    r = await client.post(url, json=stale)
    assert r.status_code == 403
    assert "stale" in r.json()["error"]

    wrong_key = mailgun_body(data, key="not-the-key")
    assert (await client.post(url, json=wrong_key)).status_code == 403
    tampered = mailgun_body(data)
    tampered["signature"]["token"] += "x"
    assert (await client.post(url, json=tampered)).status_code == 403
    assert (await client.post(url, json={"event-data": data})).status_code == 403

    unknown = await client.post("/v1/webhooks/mailgun/wk_nobody", json=mailgun_body(data))
    assert unknown.status_code == 401

    events, rejected = await published(runtime)
    assert len(events) == 1 and rejected == []  # only the first, accepted request


def test_seen_tokens_forget_after_the_window() -> None:
    now = [1000.0]
    seen = SeenTokens(window_s=300, max_size=2, clock=lambda: now[0])
    seen.add("a")
    assert "a" in seen
    now[0] += 601
    assert "a" not in seen
    for t in ("b", "c", "d"):
        seen.add(t)
    assert "b" not in seen and "c" in seen and "d" in seen
