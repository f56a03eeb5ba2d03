"""The CRM webhook: POST each queued ``crm_webhook_deliveries`` row, signed, with retries
and a dead-letter; a task of its own beside the activation consumer, so a slow or broken
receiver never holds up the feed (the queue just grows).

What a receiver gets (headers, the signature and :func:`verify`), the retry schedule, the
dead-letter and :func:`redrive`, and how several processes share the queue are specified
in docs/crm-webhook.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream import logs, metrics
from cdp_stream.activation.crm import repository as crm_repo
from cdp_stream.retry import exponential, stopped_within
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_HEADER = "X-CDP-Delivery"
KIND_HEADER = "X-CDP-Kind"
TIMESTAMP_HEADER = "X-CDP-Timestamp"
SIGNATURE_HEADER = "X-CDP-Signature"
MAX_BACKOFF_S = 3600.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-CDP-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str | int,
    body: bytes,
    signature: str,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """What a receiver checks: the signature matches and the timestamp is recent."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature.strip())


def backoff_s(attempts: int, base_delay_s: float) -> float:
    """The wait before the next try after ``attempts`` failed ones."""
    return exponential(max(attempts - 1, 0), base_delay_s, MAX_BACKOFF_S)


@dataclass(frozen=True, slots=True)
class Due:
    id: int
    kind: str
    body: bytes  # the payload's JSON, sent as stored
    attempts: int


async def claim(engine: AsyncEngine, limit: int, lease_s: float) -> list[Due]:
    """Take up to ``limit`` due pending deliveries, oldest first, leased for ``lease_s``."""
    async with engine.begin() as conn:
        rows = await crm_repo.claim_due(conn, limit, lease_s)
        found = [Due(r.id, r.kind, r.body.encode(), r.attempts) for r in rows]
    return sorted(found, key=lambda d: d.id)


def _profile_of(due: Due) -> str | None:
    """The profile a delivery is about (every payload names it), for its log lines."""
    try:
        payload = orjson.loads(due.body)
    except orjson.JSONDecodeError:
        return None
    return str(payload.get("profile_id")) if isinstance(payload, dict) else None


async def _record(
    engine: AsyncEngine, due: Due, error: str | None, max_attempts: int, base_delay_s: float
) -> None:
    attempts = due.attempts + 1
    if error is None:
        async with engine.begin() as conn:
            await crm_repo.mark_delivered(conn, due.id, attempts)
        metrics.webhook_deliveries.labels("delivered").inc()
        return
    dead = attempts >= max_attempts
    wait = 0.0 if dead else backoff_s(attempts, base_delay_s)
    log_ = log.warning if dead else log.info
    with logs.bind(profile_id=_profile_of(due)):
        log_(
            "CRM webhook delivery %s attempt %s failed%s: %s",
            due.id,
            attempts,
            " (dead)" if dead else "",
            error[:200],
        )
    async with engine.begin() as conn:
        status = "dead" if dead else "pending"
        await crm_repo.mark_failed(conn, due.id, attempts, status, error[:2000], wait)
    metrics.webhook_deliveries.labels("dead" if dead else "retry").inc()


async def _release(engine: AsyncEngine, ids: list[int]) -> None:
    """Hand claimed but unsent rows back at once (stopping), rather than at lease end."""
    if ids:
        async with engine.begin() as conn:
            await crm_repo.release(conn, ids)


async def post(client: httpx.AsyncClient, settings: Settings, due: Due) -> str | None:
    """POST one delivery; None when the receiver took it, else what went wrong."""
    assert settings.crm_webhook_url is not None
    body = due.body
    now = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "cdp-stream-webhook",
        KIND_HEADER: due.kind,
        DELIVERY_HEADER: str(due.id),
        TIMESTAMP_HEADER: str(now),
    }
    if settings.crm_webhook_secret:
        headers[SIGNATURE_HEADER] = sign(settings.crm_webhook_secret, now, body)
    try:
        response = await client.post(settings.crm_webhook_url, content=body, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.is_success:
        return None
    return f"HTTP {response.status_code}: {response.text[:500]}"


async def deliver_due(
    engine: AsyncEngine,
    settings: Settings,
    client: httpx.AsyncClient,
    *,
    base_delay_s: float,
    batch_size: int = 20,
    timeout_s: float = 10.0,
    stop: asyncio.Event | None = None,
) -> int:
    """One pass: send what is due, in id order (a contact before its interactions, unless
    one of them is retrying); returns how many were tried."""
    batch = await claim(engine, batch_size, lease_s=timeout_s * batch_size + 30.0)
    for index, due in enumerate(batch):
        if stop is not None and stop.is_set():
            await _release(engine, [d.id for d in batch[index:]])
            return index
        error = await post(client, settings, due)
        await _record(engine, due, error, settings.crm_webhook_max_attempts, base_delay_s)
    return len(batch)


async def prune_delivered(engine: AsyncEngine, keep_s: float) -> int:
    """Delete the deliveries delivered more than ``keep_s`` ago; returns how many."""
    async with engine.begin() as conn:
        return await crm_repo.delete_delivered(conn, keep_s)


async def run_deliveries(
    engine: AsyncEngine,
    settings: Settings,
    stop: asyncio.Event,
    *,
    base_delay_s: float = 5.0,
    poll_interval_s: float = 1.0,
    batch_size: int = 20,
    timeout_s: float = 10.0,
    prune_every_s: float = 600.0,
) -> None:
    """Deliver until ``stop`` (pruning old delivered rows every ``prune_every_s``); without
    a webhook URL, only wait for ``stop``. A failure of its own (the database away) is
    logged and retried: this task must not die quietly."""
    if not settings.crm_webhook_url:
        await stop.wait()
        return
    if not settings.crm_webhook_secret:
        log.warning("CDP_CRM_WEBHOOK_SECRET is unset: CRM webhook requests go out unsigned")
    keep_s = settings.crm_webhook_keep_delivered_days * 86400
    next_prune = 0.0
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        while not stop.is_set():
            try:
                if time.monotonic() >= next_prune:
                    pruned = await prune_delivered(engine, keep_s)
                    log.debug("pruned %d delivered CRM webhook rows", pruned)
                    next_prune = time.monotonic() + prune_every_s
                sent = await deliver_due(
                    engine,
                    settings,
                    client,
                    base_delay_s=base_delay_s,
                    batch_size=batch_size,
                    timeout_s=timeout_s,
                    stop=stop,
                )
            except Exception:
                log.exception("CRM webhook deliveries failed; retrying")
                sent = 0
            if not sent:
                await stopped_within(stop, poll_interval_s)


async def redrive(engine: AsyncEngine) -> int:
    """Queue every dead delivery again (attempts from zero, due now); returns how many."""
    async with engine.begin() as conn:
        return await crm_repo.requeue_dead(conn)
