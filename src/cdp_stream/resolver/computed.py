"""Computed traits: a commutative, associative merge, so arrival order never matters.

``of_event`` turns one event into the computed value of a profile that saw only it;
``merge`` combines two and ``fold`` adds one into another in place (the resolver folds a
batch's events once per profile). Pure, no I/O. Each field and its rule:
docs/computed-traits.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from cdp_stream import computed_traits
from cdp_stream.event_names import (
    EMAIL_BOUNCED,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    ORDER_COMPLETED,
    name_key,
)
from cdp_stream.payload import as_mapping

_COUNTERS = computed_traits.EVENT_COUNTERS
_EMAIL_COUNTERS = {
    name_key(EMAIL_OPENED): "email_opens",
    name_key(EMAIL_LINK_CLICKED): "email_clicks",
    name_key(EMAIL_BOUNCED): "email_bounces",
}


ORDER_FIELDS = computed_traits.ORDER_FIELDS


def of_event(event: Mapping[str, Any], ts: str) -> dict[str, Any]:
    """The computed value of a profile that has seen only ``event`` (stamped ``ts``)."""
    out: dict[str, Any] = {"event_count": 1, "first_seen": ts, "last_seen": ts}
    out["channels"] = [event.get("channel") or "other"]
    if event.get("type") == "page":
        out["page_views"] = 1
    name = event.get("event")
    lowered = name_key(name) if event.get("type") == "track" and isinstance(name, str) else ""
    if lowered in _EMAIL_COUNTERS:
        out[_EMAIL_COUNTERS[lowered]] = 1
    elif lowered == name_key(ORDER_COMPLETED):
        out["last_order_at"] = ts
    touch = _touch(event, ts)
    if touch is not None:
        out["first_touch"] = out["last_touch"] = touch
    return out


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The computed value of the union of the events behind ``a`` and ``b`` (the money
    fields as ``a`` has them)."""
    out = dict(a)
    fold(out, b)
    return out


def fold(into: dict[str, Any], part: Mapping[str, Any]) -> None:
    """Add the events behind ``part`` to ``into``, in place (money fields untouched)."""
    for name in _COUNTERS:
        if name in part:
            into[name] = into.get(name, 0) + part[name]
    for name, pick in (("first_seen", min), ("last_seen", max), ("last_order_at", max)):
        value = part.get(name)
        if value is not None:
            have = into.get(name)
            into[name] = value if have is None else pick(have, value)
    channels = part.get("channels")
    if channels and not set(channels).issubset(into.get("channels", ())):
        into["channels"] = sorted(set(into.get("channels", ())) | set(channels))
    for name, pick in (("first_touch", min), ("last_touch", max)):
        touch = part.get(name)
        if touch:
            have = into.get(name)
            into[name] = touch if not have else pick(have, touch, key=_touch_order)


def _touch(event: Mapping[str, Any], ts: str) -> dict[str, Any] | None:
    context = as_mapping(event.get("context"))
    campaign, page = as_mapping(context.get("campaign")), as_mapping(context.get("page"))
    touch = {
        "source": campaign.get("source"),
        "medium": campaign.get("medium"),
        "campaign": campaign.get("name"),
        "referrer": page.get("referrer") or None,
    }
    if not any(isinstance(v, str) and v for v in touch.values()):
        return None
    return {"at": ts, "message_id": event.get("messageId"), **touch}


def _touch_order(touch: Mapping[str, Any]) -> tuple[str, str, bytes]:
    """Time, then messageId, then content: a total order, so min/max never depend on
    which of two equal-time touches came first."""
    content = orjson.dumps(touch, option=orjson.OPT_SORT_KEYS)
    return touch["at"], str(touch.get("message_id")), content
