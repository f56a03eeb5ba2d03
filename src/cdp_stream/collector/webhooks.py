"""Email provider event webhooks: ``POST /v1/webhooks/{sendgrid,mailgun}/{write_key}``.

The provider's events become Segment email spec ``track`` events and then take the
collector's own path (:func:`intake`, the same topics and answer rules). A request goes:
bounded read -> signature check -> strict JSON -> the path's write key -> translate each
provider event -> ``intake`` -> publish. The decisions (who the recipient is, messageIds,
the mapping, replays) are specified in docs/email-webhooks.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cdp_stream.bus.base import Bus, BusUnavailable, Record
from cdp_stream.collector._json import BadRequest, loads_strict
from cdp_stream.collector.auth import Sources
from cdp_stream.collector.intake import intake, rejection_record
from cdp_stream.collector.routes import bus_unavailable, error_response, raw_headers, read_body
from cdp_stream.event_names import (
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_LINK_CLICKED,
    EMAIL_MARKED_AS_SPAM,
    EMAIL_OPENED,
    UNSUBSCRIBED,
)
from cdp_stream.openapi import Error, WebhookAccepted, responses
from cdp_stream.settings import Settings

router = APIRouter(tags=["webhooks"])

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
MAILGUN_MAX_AGE_S = 300.0
MAILGUN_TOKENS_KEPT = 100_000

SENDGRID_EVENTS = {
    "delivered": EMAIL_DELIVERED,
    "open": EMAIL_OPENED,
    "click": EMAIL_LINK_CLICKED,
    "bounce": EMAIL_BOUNCED,
    "spamreport": EMAIL_MARKED_AS_SPAM,
    "unsubscribe": UNSUBSCRIBED,
    "group_unsubscribe": UNSUBSCRIBED,
}
SENDGRID_NOT_TRACKED = frozenset({"processed", "deferred", "dropped"})
MAILGUN_EVENTS = {
    "delivered": EMAIL_DELIVERED,
    "opened": EMAIL_OPENED,
    "clicked": EMAIL_LINK_CLICKED,
    "complained": EMAIL_MARKED_AS_SPAM,
    "unsubscribed": UNSUBSCRIBED,
}
MAILGUN_NOT_TRACKED = frozenset({"accepted", "rejected", "stored", "list_member_uploaded"})


class _Untracked(Exception):
    """This provider event has no Segment spec counterpart; the reason says why."""


# --- signatures --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _sendgrid_key(encoded: str) -> ec.EllipticCurvePublicKey:
    key = load_der_public_key(base64.b64decode(encoded))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the SendGrid verification key is not an EC public key")
    return key


def sendgrid_signature_ok(public_key: str, signature: str, timestamp: str, body: bytes) -> bool:
    """SendGrid's signed event webhook: ECDSA P-256/SHA-256 over timestamp + raw body,
    the signature base64 DER, the key the base64 DER public key SendGrid shows."""
    try:
        der = base64.b64decode(signature, validate=True)
        _sendgrid_key(public_key).verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def mailgun_signature_ok(signing_key: str, timestamp: str, token: str, signature: str) -> bool:
    """Mailgun: hex HMAC-SHA256 of timestamp + token under the webhook signing key."""
    expected = hmac.new(
        signing_key.encode(), (timestamp + token).encode(), hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, signature.lower())


class SeenTokens:
    """Mailgun tokens accepted within the replay window: an in-memory LRU per process."""

    def __init__(
        self,
        window_s: float = MAILGUN_MAX_AGE_S,
        max_size: int = MAILGUN_TOKENS_KEPT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._max_size = max_size
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def _expire(self) -> None:
        horizon = self._clock() - 2 * self._window_s  # the window reaches both ways
        while self._seen and (
            len(self._seen) > self._max_size or next(iter(self._seen.values())) < horizon
        ):
            self._seen.popitem(last=False)

    def __contains__(self, token: object) -> bool:
        self._expire()
        return token in self._seen

    def discard(self, token: str) -> None:
        self._seen.pop(token, None)

    def add(self, token: str) -> None:
        self._seen[token] = self._clock()
        self._seen.move_to_end(token)
        self._expire()


# --- translation ---------------------------------------------------------------------------


def _anonymous_id(email: object) -> str | None:
    if not isinstance(email, str) or not email.strip():
        return None
    return "email-sha256:" + hashlib.sha256(email.strip().lower().encode()).hexdigest()


def _iso_from_unix(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def _track(
    name: str,
    provider: str,
    raw: dict[str, Any],
    *,
    email: object,
    event_id: object,
    timestamp: object,
    properties: dict[str, Any],
    context: dict[str, Any],
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "event": name,
        "properties": {**{k: v for k, v in properties.items() if v is not None}, provider: raw},
        "context": {
            **{k: v for k, v in context.items() if v is not None},
            "traits": {"email": email},
            "integration": {"name": provider},
        },
    }
    anonymous_id = _anonymous_id(email)
    if anonymous_id is not None:
        event["anonymousId"] = anonymous_id
    if isinstance(event_id, str) and event_id:
        event["messageId"] = event_id
    iso = _iso_from_unix(timestamp)
    if iso is not None:
        event["timestamp"] = iso
    return event


def sendgrid_event(raw: Any) -> dict[str, Any]:
    """One SendGrid event as a Segment track event; raises :class:`_Untracked`."""
    if not isinstance(raw, dict):
        raise _Untracked("a SendGrid event must be a JSON object")
    kind = raw.get("event")
    name = SENDGRID_EVENTS.get(kind) if isinstance(kind, str) else None
    if name is None:
        if kind in SENDGRID_NOT_TRACKED:
            raise _Untracked(f"SendGrid event {kind!r} has no Segment spec counterpart")
        raise _Untracked(f"unknown SendGrid event type {kind!r}")
    properties: dict[str, Any] = {"email_id": raw.get("sg_message_id")}
    if kind == "click":
        properties["link_url"] = raw.get("url")
    if kind == "bounce":
        properties["reason"] = raw.get("reason")
        properties["bounce_type"] = raw.get("type")
    if kind == "group_unsubscribe":
        properties["list_id"] = raw.get("asm_group_id")
    context = {"ip": raw.get("ip"), "userAgent": raw.get("useragent")}
    if not all(isinstance(v, str) or v is None for v in context.values()):
        context = {}
    return _track(
        name,
        "sendgrid",
        raw,
        email=raw.get("email"),
        event_id=raw.get("sg_event_id"),
        timestamp=raw.get("timestamp"),
        properties=properties,
        context=context,
    )


def mailgun_event(data: Any) -> dict[str, Any]:
    """Mailgun's ``event-data`` as a Segment track event; raises :class:`_Untracked`."""
    if not isinstance(data, dict):
        raise _Untracked('a Mailgun webhook needs "event-data": an object')
    kind = data.get("event")
    if kind == "failed":
        if data.get("severity") != "permanent":
            raise _Untracked(
                f"Mailgun failure of severity {data.get('severity')!r} is not a bounce"
            )
        name: str | None = EMAIL_BOUNCED
    else:
        name = MAILGUN_EVENTS.get(kind) if isinstance(kind, str) else None
    if name is None:
        if kind in MAILGUN_NOT_TRACKED:
            raise _Untracked(f"Mailgun event {kind!r} has no Segment spec counterpart")
        raise _Untracked(f"unknown Mailgun event type {kind!r}")
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    headers = headers if isinstance(headers, dict) else {}
    properties: dict[str, Any] = {
        "email_id": headers.get("message-id"),
        "email_subject": headers.get("subject"),
    }
    if kind == "clicked":
        properties["link_url"] = data.get("url")
    if kind == "failed":
        status = data.get("delivery-status")
        if isinstance(status, dict):
            properties["reason"] = status.get("description") or status.get("message")
        properties["bounce_type"] = data.get("reason")
    client = data.get("client-info")
    context: dict[str, Any] = {"ip": data.get("ip")}
    if isinstance(client, dict):
        context["userAgent"] = client.get("user-agent")
    if not all(isinstance(v, str) or v is None for v in context.values()):
        context = {}
    return _track(
        name,
        "mailgun",
        data,
        email=data.get("recipient"),
        event_id=data.get("id"),
        timestamp=data.get("timestamp"),
        properties=properties,
        context=context,
    )


# --- the shared publishing path ----------------------------------------------------------


async def _publish(
    request: Request,
    provider: str,
    raw_events: list[Any],
    translate: Callable[[Any], dict[str, Any]],
    source_id: str,
    received_at: datetime,
) -> JSONResponse:
    """Translate, run every event through the collector's intake, publish, answer."""
    settings: Settings = request.app.state.settings
    bus: Bus = request.app.state.bus
    endpoint = f"webhooks/{provider}"
    records: list[Record] = []
    rejected: list[dict[str, Any]] = []
    accepted = 0
    for index, raw in enumerate(raw_events):
        try:
            event = translate(raw)
        except _Untracked as exc:
            record = rejection_record(raw, endpoint, index, str(exc), source_id, received_at)
            records.append(Record(settings.topics.rejected, source_id.encode(), record))
            rejected.append({"index": index, "reason": str(exc)})
            continue
        # One event per intake call, so that a refusal keeps its provider index.
        result = intake(
            {"batch": [event]},
            "batch",
            settings=settings,
            rules=request.app.state.rules,
            source_id=source_id,
            received_at=received_at,
            ip=None,  # the provider's server, not the recipient
            user_agent=None,
        )
        for a in result.accepted:
            records.append(Record(settings.topics.events, a.key, a.value))
            accepted += 1
        for r in result.rejected:
            if r.record is not None:  # an oversize event is refused, never published
                record = rejection_record(event, endpoint, index, r.reason, source_id, received_at)
                records.append(Record(settings.topics.rejected, source_id.encode(), record))
            rejected.append({"index": index, "messageId": r.message_id, "reason": r.reason})
    try:
        await bus.publish_many(records)
    except BusUnavailable as exc:
        return bus_unavailable(exc, settings)
    return JSONResponse(
        {"success": True, "accepted": accepted, **({"rejected": rejected} if rejected else {})}
    )


async def _source(request: Request, write_key: str) -> str | None:
    sources: Sources = request.app.state.sources
    found = await sources.by_write_key(write_key)
    return found.id if found else None


_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"model": WebhookAccepted, "description": "published (refused events listed)"},
    **responses(400, 401, 403, 413, 415, 503, model=Error),
}


def _body(schema: dict[str, Any], signature: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``openapi_extra`` of a webhook: its JSON body (read by hand, after the signature
    check) and its signature headers."""
    body = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
    return {**body, "parameters": signature} if signature else body


_SENDGRID_BODY = _body(
    {"type": "array", "items": {"type": "object"}, "description": "SendGrid's events"},
    [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
        for name in (SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP)
    ],
)
_MAILGUN_BODY = _body(
    {
        "type": "object",
        "required": ["signature", "event-data"],
        "properties": {
            "signature": {
                "type": "object",
                "required": ["timestamp", "token", "signature"],
                "properties": {
                    "timestamp": {"type": "string"},
                    "token": {"type": "string"},
                    "signature": {"type": "string"},
                },
            },
            "event-data": {"type": "object", "description": "Mailgun's event"},
        },
    }
)


@router.post("/v1/webhooks/sendgrid/{source}", responses=_ANSWERS, openapi_extra=_SENDGRID_BODY)
async def sendgrid_webhook(request: Request, source: str) -> JSONResponse:
    """SendGrid's signed event webhook: a JSON array of events."""
    settings: Settings = request.app.state.settings
    received_at = datetime.now(UTC)
    try:
        body = await read_body(
            request.receive, raw_headers(request.scope), settings.max_request_bytes
        )
        key = settings.sendgrid_verification_key
        signature = request.headers.get(SENDGRID_SIGNATURE)
        timestamp = request.headers.get(SENDGRID_TIMESTAMP)
        if key is None:
            return error_response(403, "SendGrid webhooks are not configured (no verification key)")
        if not signature or not timestamp:
            return error_response(403, f"missing {SENDGRID_SIGNATURE} or {SENDGRID_TIMESTAMP}")
        if not sendgrid_signature_ok(key, signature, timestamp, body):
            return error_response(403, "invalid SendGrid signature")
        events = loads_strict(body, settings.max_json_depth)
        if not isinstance(events, list):
            raise BadRequest(400, "a SendGrid webhook body must be a JSON array of events")
        if len(events) > settings.max_batch_events:
            raise BadRequest(
                400, f"{len(events)} events is over the {settings.max_batch_events}-event limit"
            )
    except BadRequest as exc:
        return error_response(exc.status, exc.message)
    source_id = await _source(request, source)
    if source_id is None:
        return error_response(401, "unknown write key")
    return await _publish(request, "sendgrid", events, sendgrid_event, source_id, received_at)


def _seen_tokens(request: Request) -> SeenTokens:
    state = request.app.state
    seen = getattr(state, "mailgun_tokens", None)
    if not isinstance(seen, SeenTokens):
        seen = SeenTokens()
        state.mailgun_tokens = seen
    return seen


@router.post("/v1/webhooks/mailgun/{source}", responses=_ANSWERS, openapi_extra=_MAILGUN_BODY)
async def mailgun_webhook(request: Request, source: str) -> JSONResponse:
    """Mailgun's JSON event webhook: ``{"signature": {...}, "event-data": {...}}``."""
    settings: Settings = request.app.state.settings
    received_at = datetime.now(UTC)
    try:
        body = loads_strict(
            await read_body(
                request.receive, raw_headers(request.scope), settings.max_request_bytes
            ),
            settings.max_json_depth,
        )
    except BadRequest as exc:
        return error_response(exc.status, exc.message)
    key = settings.mailgun_signing_key
    if key is None:
        return error_response(403, "Mailgun webhooks are not configured (no signing key)")
    signed = body.get("signature") if isinstance(body, dict) else None
    fields = (
        [signed.get(k) for k in ("timestamp", "token", "signature")]
        if isinstance(signed, dict)
        else []
    )
    if fields and isinstance(fields[0], int) and not isinstance(fields[0], bool):
        fields[0] = str(fields[0])
    if len(fields) != 3 or not all(isinstance(f, str) and f for f in fields):
        return error_response(403, 'missing "signature": {"timestamp", "token", "signature"}')
    timestamp, token, signature = (str(f) for f in fields)
    if not mailgun_signature_ok(key, timestamp, token, signature):
        return error_response(403, "invalid Mailgun signature")
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return error_response(403, "invalid Mailgun signature timestamp")
    if not age <= MAILGUN_MAX_AGE_S:  # also refuses NaN
        return error_response(403, "stale Mailgun signature (more than 5 minutes off)")
    seen = _seen_tokens(request)
    if token in seen:
        return error_response(403, "replayed Mailgun token")
    source_id = await _source(request, source)
    if source_id is None:
        return error_response(401, "unknown write key")
    assert isinstance(body, dict)
    seen.add(token)  # before publishing: a concurrent copy of this request is a replay
    response = await _publish(
        request, "mailgun", [body.get("event-data")], mailgun_event, source_id, received_at
    )
    if response.status_code != 200:
        seen.discard(token)  # nothing was accepted: the provider's retry must go through
    return response
