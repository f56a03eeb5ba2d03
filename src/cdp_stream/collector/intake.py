"""From a parsed request body to the records the collector publishes.

Each event of the request, on its own: merge the batch-level defaults -> validate with the
models of :mod:`cdp_stream.events` -> enrich (messageId, timestamps, ip, user agent,
channel, source) -> serialize, refusing what Postgres or JavaScript could not hold. An
event that fails a step becomes a :class:`Rejected` (published to ``cdp.events.rejected``
with its reason); the others become :class:`Accepted`. Only a problem with the request as
a whole (not an object, no ``batch`` array, too many events, an oversize single event)
raises :class:`BadRequest`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from cdp_stream.collector._json import BadRequest
from cdp_stream.collector.ecommerce import ecommerce_violation
from cdp_stream.event_names import EMAIL_EVENTS, PURCHASE_EVENTS, name_key
from cdp_stream.events import EVENT_TYPES, MODELS, Batch, Channel
from cdp_stream.identity import ANONYMOUS_ID, USER_ID, IdentityRules
from cdp_stream.settings import Settings
from cdp_stream.timestamps import utc_text

# A client clock this far ahead, or a time before this, is not believed.
FUTURE_TOLERANCE = timedelta(days=1)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Accepted:
    """An enriched event for ``cdp.events``, keyed by its routing identifier."""

    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused event; ``record`` is its dead letter (None: too big to publish at all)."""

    index: int
    message_id: str | None
    reason: str
    record: bytes | None


@dataclass(slots=True)
class IntakeResult:
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class _Refused(Exception):
    """One event is refused, for the reason given."""


def body_write_key(body: object) -> str | None:
    """The ``writeKey`` given in the body, the alternative to HTTP Basic auth."""
    key = body.get("writeKey") if isinstance(body, dict) else None
    return key if isinstance(key, str) and key else None


def intake(
    body: Any,
    endpoint: str,
    *,
    settings: Settings,
    rules: IdentityRules,
    source_id: str,
    received_at: datetime,
    ip: str | None,
    user_agent: str | None,
) -> IntakeResult:
    """Validate and enrich every event of one request (see the module docstring)."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    if endpoint == "batch":
        items, defaults = _batch_items(body, settings.max_batch_events)
    else:
        items, defaults = [body], {}

    result = IntakeResult()
    server = _Server(source_id, received_at, utc_text(received_at), ip, user_agent)
    for index, raw in enumerate(items):
        event = _with_defaults(raw, defaults)
        try:
            enriched = _enrich(event, endpoint, server)
            value = _serialize(enriched)
            if len(value) > settings.max_event_bytes:
                size = len(_dumps_any(raw))
                if size > settings.max_event_bytes:
                    reason = (
                        f"event is {size} bytes, over the {settings.max_event_bytes}-byte limit"
                    )
                    if endpoint != "batch":
                        raise BadRequest(413, reason)
                    result.rejected.append(Rejected(index, _message_id(raw), reason, None))
                    continue
        except _Refused as exc:
            record = rejection_record(raw, endpoint, index, str(exc), source_id, received_at)
            result.rejected.append(Rejected(index, _message_id(raw), str(exc), record))
            continue
        result.accepted.append(Accepted(_routing_key(enriched, rules), value))
    return result


def _batch_items(body: dict[str, Any], max_events: int) -> tuple[list[Any], dict[str, Any]]:
    """The events of a batch and the defaults its top level gives them."""
    items = body.get("batch")
    if not isinstance(items, list):
        raise BadRequest(400, 'a batch needs "batch": an array of events')
    if len(items) > max_events:
        raise BadRequest(400, f"batch of {len(items)} events is over the {max_events}-event limit")
    try:
        Batch.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(400, f"invalid batch: {_reason(exc)}") from exc
    defaults: dict[str, Any] = {
        k: body[k] for k in ("context", "integrations", "sentAt") if k in body
    }
    return items, defaults


def _with_defaults(raw: Any, defaults: dict[str, Any]) -> Any:
    """The event with the batch's defaults under its own values (contexts merge by key)."""
    if not isinstance(raw, dict) or not defaults:
        return raw
    event = {**defaults, **raw}
    shared, own = defaults.get("context"), raw.get("context")
    if isinstance(shared, dict) and isinstance(own, dict):
        event["context"] = {**shared, **own}
    return event


@dataclass(frozen=True, slots=True)
class _Server:
    """What the server adds to every event of one request (formatted once per request)."""

    source_id: str
    received_at: datetime
    received_iso: str
    ip: str | None
    user_agent: str | None


def _enrich(event: Any, endpoint: str, server: _Server) -> dict[str, Any]:
    """The validated event with the server's fields; raises :class:`_Refused`."""
    if not isinstance(event, dict):
        raise _Refused("an event must be a JSON object")
    if endpoint != "batch":
        event = {**event, "type": endpoint}  # the endpoint says what it is
    elif event.get("type") not in EVENT_TYPES:
        raise _Refused(f"type: must be one of {', '.join(EVENT_TYPES)}")
    try:
        model = MODELS[event["type"]].model_validate(event)
    except ValidationError as exc:
        raise _Refused(_reason(exc)) from exc
    if (violation := ecommerce_violation(event)) is not None:
        raise _Refused(violation)

    out = {k: v for k, v in event.items() if k != "writeKey"}
    for name in ("userId", "anonymousId", "groupId", "previousId", "previousUserId"):
        if event.get(name) is not None:
            out[name] = getattr(model, name)  # integers become strings
    timestamp, untrusted = _event_time(
        model.timestamp, model.originalTimestamp, model.sentAt, server.received_at
    )
    out["timestamp"] = utc_text(timestamp)
    out["receivedAt"] = server.received_iso
    if model.sentAt is not None:
        out["sentAt"] = utc_text(_utc(model.sentAt))
    original = event.get("originalTimestamp", event.get("timestamp"))
    if original is not None:
        out["originalTimestamp"] = original
    out["sourceId"] = server.source_id
    out["messageId"] = model.messageId or _generated_message_id(server.source_id, event)
    context = dict(event.get("context") or {})
    if server.ip is not None:
        context.setdefault("ip", server.ip)
    if server.user_agent is not None:
        context.setdefault("userAgent", server.user_agent)
    out["context"] = context
    out["channel"] = channel_of(out)
    if untrusted:
        out["flags"] = ["timestamp_untrusted"]
    else:
        out.pop("flags", None)
    return out


def _utc(value: datetime) -> datetime:
    """A naive time is UTC (what the Segment libraries send is always zoned)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _event_time(
    timestamp: datetime | None,
    original: datetime | None,
    sent_at: datetime | None,
    received_at: datetime,
) -> tuple[datetime, bool]:
    """When the event happened by the server's clock, and whether the client's was untrusted.

    With ``sentAt`` the client's clock offset is removed (Segment's rule:
    ``receivedAt - (sentAt - originalTimestamp)``); without it the client's time is used.
    """
    client = original or timestamp
    if client is None:
        return received_at, False
    when = _utc(client)
    if sent_at is not None:
        try:
            when = received_at - (_utc(sent_at) - when)
        except OverflowError:  # e.g. sentAt in year 1, originalTimestamp in 9999
            raise _Refused(
                "sentAt and originalTimestamp are too far apart: the clock-skew correction "
                "receivedAt - (sentAt - originalTimestamp) is not a date"
            ) from None
    if when > received_at + FUTURE_TOLERANCE or when < EARLIEST:
        return received_at, True
    return when, False


def _generated_message_id(source_id: str, event: Mapping[str, Any]) -> str:
    """A messageId for an event that has none.

    When the client gave the event its own time, the id is derived from the event's
    content, so a client that retries a request (after a 503, say) does not store the
    event twice. Without a client time two identical events may well be two real ones
    (two clicks), so they get random ids.
    """
    if event.get("timestamp") is None and event.get("originalTimestamp") is None:
        return f"cdp-{uuid.uuid4()}"
    digest = hashlib.sha256(source_id.encode() + b"\x1f" + _dumps_any(event, sort=True))
    return f"cdp-{digest.hexdigest()[:32]}"


def channel_of(event: Mapping[str, Any]) -> Channel:
    """website / email / purchase / other, from the event's type, name and context."""
    name = event.get("event")
    if event.get("type") == "track" and isinstance(name, str):
        lowered = name_key(name)
        if lowered in PURCHASE_EVENTS:
            return "purchase"
        if lowered in EMAIL_EVENTS:
            return "email"
    context = event.get("context") or {}
    if event.get("type") == "page" or isinstance(context.get("page"), dict):
        return "website"
    return "other"


def _routing_key(event: Mapping[str, Any], rules: IdentityRules) -> bytes:
    """The partition key: the browser's anonymousId when the event has a usable one, then
    the userId, then its highest-priority usable identifier.

    Why the browser first: a website sends most events, and every one of them carries the
    browser's anonymousId, before sign-in and after, and so does the ``identify`` that
    links it to the userId. Keyed by it, a visitor's whole browser history and the sign-in
    that merges it meet in one partition, so one resolver does that merge and no other
    resolver holds the identifiers meanwhile. Keyed by userId first (as before), the
    signed-in half of a browser's events left the anonymous half's partition and two
    resolvers queued on the anonymous id at every sign-in. Backend events (orders, with a
    userId only) and email events (an email only) cannot be routed to the browser's
    partition without a lookup; they go by their own id. On the resolver benchmark's
    generated history (browsers, sign-ins, orders, emails, shared devices) the share of
    events touching an identifier that another partition also touches went from 74% to
    57% with this order.

    Values that never link anyone ("undefined", "0", ...) are passed over, so such junk
    does not pile into one partition; an event left with no usable id is spread by its
    messageId."""
    for type_, name in ((ANONYMOUS_ID, "anonymousId"), (USER_ID, "userId")):
        value = rules.normalize(type_, event.get(name))
        if value is not None:
            return f"{type_}:{value}".encode()
    usable = rules.identifiers_of(event)
    return (usable[0].ref() if usable else f"message_id:{event['messageId']}").encode()


def _serialize(event: Mapping[str, Any]) -> bytes:
    """orjson bytes of a storable event; raises :class:`_Refused` for what is not."""
    try:
        value = orjson.dumps(event, option=orjson.OPT_STRICT_INTEGER)
    except orjson.JSONEncodeError as exc:
        if "-bit range" in str(exc):  # orjson: "exceeds 53-bit range" or "64-bit"
            raise _Refused("an integer is outside ±(2^53-1), the range JSON keeps exact") from exc
        if "surrogates" in str(exc):
            raise _Refused("a string holds a lone UTF-16 surrogate (not valid Unicode)") from exc
        raise _Refused(f"cannot be encoded: {exc}") from exc
    if b"\\u0000" in value and _has_nul(event):
        raise _Refused("a string holds \\u0000 (NUL), which Postgres jsonb cannot store")
    return value


def _has_nul(value: Any) -> bool:
    """Does a NUL character occur in any key or string? (The byte search above can be
    fooled by a literal backslash followed by ``u0000``.)"""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _dumps_any(value: Any, sort: bool = False) -> bytes:
    """JSON for anything ``loads_strict`` produced, even what orjson refuses (big integers,
    lone surrogates): the dead letter must keep the event as it came."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort else 0)
    except orjson.JSONEncodeError:
        return json.dumps(value, sort_keys=sort, separators=(",", ":")).encode()


def _message_id(raw: Any) -> str | None:
    mid = raw.get("messageId") if isinstance(raw, dict) else None
    return mid if isinstance(mid, str) else None


def rejection_record(
    raw: Any, endpoint: str, index: int, reason: str, source_id: str, received_at: datetime
) -> bytes:
    """A ``cdp.events.rejected`` record (see :class:`cdp_stream.events.Rejection`)."""
    return _dumps_any(
        {
            "sourceId": source_id,
            "receivedAt": utc_text(received_at),
            "endpoint": endpoint,
            "index": index,
            "messageId": _message_id(raw),
            "reason": reason,
            "event": raw,
        }
    )


def _reason(exc: ValidationError) -> str:
    """A short, readable reason from pydantic's errors: ``field.path: message; ...``."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        path = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{path}: {message}" if path else message)
    return "; ".join(parts)
