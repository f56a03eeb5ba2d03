"""Computed traits: a commutative, associative merge, so arrival order never matters.

``of_event`` turns one event into the computed value of a profile that saw only it;
``merge`` combines two computed values. Folding an event is ``merge(state, of_event(e))``
and merging two profiles is ``merge(a, b)``: one rule for both, so a profile built from
any interleaving of its events, and of merges, ends the same. Pure, no I/O.

Fields (timestamps are fixed-width UTC strings, so they compare as text):

* ``event_count``; ``first_seen`` / ``last_seen`` (min / max event timestamp)
* ``page_views`` (``page`` events); ``email_opens``, ``email_clicks``, ``email_bounces``
  (track ``Email Opened`` / ``Email Link Clicked`` / ``Email Bounced``, any case)
* ``orders``: per currency, the ``Order Completed`` events
  as ``{"count", "micros"}`` (``properties.revenue``, else ``properties.total``, in integer
  micro-units; currency upper-cased, default USD);
  ``order_count`` (all currencies), ``last_order_at``, and for the profile's ``currency``
  (the one with most orders, then alphabetical) ``total_revenue`` and
  ``average_order_value``. Money is summed in integer micro-units, so sums are exact in
  any order.
* ``first_touch`` / ``last_touch``: ``{"at", "source", "medium", "campaign", "referrer"}``
  of the earliest / latest event carrying a campaign (``context.campaign``) or a referrer
  (``context.page.referrer``); ties broken by messageId, then content.
* ``channels``: the sorted set of channels seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from cdp_stream.resolver import as_mapping

_COUNTERS = ("event_count", "page_views", "email_opens", "email_clicks", "email_bounces")
_EMAIL_EVENTS = {
    "email opened": "email_opens",
    "email link clicked": "email_clicks",
    "email bounced": "email_bounces",
}
_MICROS = 1_000_000


def of_event(event: Mapping[str, Any], ts: str) -> dict[str, Any]:
    """The computed value of a profile that has seen only ``event`` (stamped ``ts``)."""
    out: dict[str, Any] = {"event_count": 1, "first_seen": ts, "last_seen": ts}
    out["channels"] = [event.get("channel") or "other"]
    if event.get("type") == "page":
        out["page_views"] = 1
    name = event.get("event")
    lowered = name.strip().lower() if event.get("type") == "track" and isinstance(name, str) else ""
    if lowered in _EMAIL_EVENTS:
        out[_EMAIL_EVENTS[lowered]] = 1
    if lowered == "order completed":
        properties = event.get("properties") or {}
        amount = _money(properties.get("revenue", properties.get("total")))
        currency = properties.get("currency")
        currency = currency.strip().upper() if isinstance(currency, str) and currency else "USD"
        out["orders"] = {currency: {"count": 1, "micros": amount}}
        out["last_order_at"] = ts
    touch = _touch(event, ts)
    if touch is not None:
        out["first_touch"] = out["last_touch"] = touch
    return _derive(out)


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The computed value of the union of the events behind ``a`` and ``b``."""
    out: dict[str, Any] = {}
    for name in _COUNTERS:
        if name in a or name in b:
            out[name] = a.get(name, 0) + b.get(name, 0)
    for name, pick in (("first_seen", min), ("last_seen", max), ("last_order_at", max)):
        values = [v[name] for v in (a, b) if v.get(name) is not None]
        if values:
            out[name] = pick(values)
    channels = set(a.get("channels", [])) | set(b.get("channels", []))
    if channels:
        out["channels"] = sorted(channels)
    orders: dict[str, dict[str, int]] = {}
    for side in (a, b):
        for currency, o in side.get("orders", {}).items():
            have = orders.setdefault(currency, {"count": 0, "micros": 0})
            have["count"] += o["count"]
            have["micros"] += o["micros"]
    if orders:
        out["orders"] = dict(sorted(orders.items()))
    touches = [v[k] for v in (a, b) for k in ("first_touch", "last_touch") if v.get(k)]
    if touches:
        out["first_touch"] = min(touches, key=_touch_order)
        out["last_touch"] = max(touches, key=_touch_order)
    return _derive(out)


def _derive(out: dict[str, Any]) -> dict[str, Any]:
    """The fields that follow from the others: order totals for the main currency."""
    orders = out.get("orders")
    if orders:
        currency = min(orders, key=lambda c: (-orders[c]["count"], c))
        main = orders[currency]
        out["order_count"] = sum(o["count"] for o in orders.values())
        out["currency"] = currency
        out["total_revenue"] = main["micros"] / _MICROS
        out["average_order_value"] = round(main["micros"] / main["count"] / _MICROS, 6)
    return out


def _money(value: Any) -> int:
    """An amount in integer micro-units; anything that is not a number counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return round(value * _MICROS)


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
