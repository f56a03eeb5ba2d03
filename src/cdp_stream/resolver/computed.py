"""Computed traits: a commutative, associative merge, so arrival order never matters.

``of_event`` turns one event into the computed value of a profile that saw only it;
``merge`` combines two computed values. Folding an event is ``merge(state, of_event(e))``
and merging two profiles is ``merge(a, b)``: one rule for both, so a profile built from
any interleaving of its events, and of merges, ends the same. Pure, no I/O.

Fields (timestamps are fixed-width UTC strings, so they compare as text):

* ``event_count``; ``first_seen`` / ``last_seen`` (min / max event timestamp)
* ``page_views`` (``page`` events); ``email_opens``, ``email_clicks``, ``email_bounces``
  (track ``Email Opened`` / ``Email Link Clicked`` / ``Email Bounced``, any case)
* ``ledger``: the order facts everything about money is derived from (amounts in integer
  micro-units, so sums are exact in any order; currency upper-cased, default USD):

  - ``orders``: ``{order_id: [currency, micros]}`` for ``Order Completed`` events with a
    ``properties.order_id`` (a non-empty string, stripped, or an integer). An order is
    counted once however many times (by whatever messageIds) it is reported; reports that
    disagree keep the largest ``[micros, currency]``. The amount is
    ``properties.revenue``, else ``properties.total`` (not a number: 0).
  - ``unkeyed_orders``: ``{currency: [count, micros]}``, orders without an order_id,
    each report counted (sums).
  - ``refunds``: ``{order_id: micros | null}`` for ``Order Refunded`` events with an
    order_id; the amount as for orders, ``null`` when not a number (a full refund). Reports
    of one order's refund do not add up: the largest counts (a full refund is the
    largest), so report the amount refunded so far. A refund applies to its order in the
    order's currency (the refund's own currency is ignored), capped at the order's
    amount; until the order is seen it waits and changes nothing.
  - ``unkeyed_refunds``: ``{currency: micros}``, refunds without an order_id but with an
    amount (summed; without an amount there is nothing to refund); they reduce that
    currency's revenue, never below 0.

  Empty parts are left out. A value written before the ledger existed (``orders`` with
  no ``ledger``) merges as unkeyed orders.
* ``orders``: per currency with orders, ``{"count", "micros"}``: distinct orders and their
  revenue net of refunds (derived from ``ledger``); ``order_count`` (all currencies; a
  refunded order still counts), ``last_order_at`` (latest ``Order Completed`` event), and
  for the profile's ``currency`` (the one with most orders, then alphabetical)
  ``total_revenue`` (net) and ``average_order_value`` (net revenue / orders).
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
    if lowered in ("order completed", "order refunded"):
        properties = as_mapping(event.get("properties"))
        amount = properties.get("revenue", properties.get("total"))
        currency = _currency(properties.get("currency"))
        order_id = _order_id(properties.get("order_id"))
        if lowered == "order completed":
            out["last_order_at"] = ts
            if order_id is None:
                out["ledger"] = {"unkeyed_orders": {currency: [1, _money(amount)]}}
            else:
                out["ledger"] = {"orders": {order_id: [currency, _money(amount)]}}
        elif order_id is not None:
            refund = abs(_money(amount)) if _is_number(amount) else None
            out["ledger"] = {"refunds": {order_id: refund}}
        elif _is_number(amount):
            out["ledger"] = {"unkeyed_refunds": {currency: abs(_money(amount))}}
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
    ledger = _merge_ledgers(_ledger(a), _ledger(b))
    if ledger:
        out["ledger"] = ledger
    touches = [v[k] for v in (a, b) for k in ("first_touch", "last_touch") if v.get(k)]
    if touches:
        out["first_touch"] = min(touches, key=_touch_order)
        out["last_touch"] = max(touches, key=_touch_order)
    return _derive(out)


def _ledger(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ledger of a computed value; one written before ledgers existed turns its
    per-currency ``orders`` into unkeyed orders."""
    if "ledger" in value:
        return as_mapping(value["ledger"])
    old = as_mapping(value.get("orders"))
    if not old:
        return {}
    return {"unkeyed_orders": {c: [o["count"], o["micros"]] for c, o in old.items()}}


def _merge_ledgers(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Union of keyed facts (one order_id twice: the larger value, a total order, so the
    pick is a semilattice join); sums of unkeyed ones."""
    orders: dict[str, list[Any]] = {}
    refunds: dict[str, int | None] = {}
    unkeyed_orders: dict[str, list[int]] = {}
    unkeyed_refunds: dict[str, int] = {}
    for side in (a, b):
        for order_id, value in as_mapping(side.get("orders")).items():
            have = orders.get(order_id)
            if have is None or _order_rank(value) > _order_rank(have):
                orders[order_id] = list(value)
        for order_id, refund in as_mapping(side.get("refunds")).items():
            if order_id not in refunds or _refund_rank(refund) > _refund_rank(refunds[order_id]):
                refunds[order_id] = refund
        for currency, (count, micros) in as_mapping(side.get("unkeyed_orders")).items():
            total = unkeyed_orders.setdefault(currency, [0, 0])
            total[0] += count
            total[1] += micros
        for currency, micros in as_mapping(side.get("unkeyed_refunds")).items():
            unkeyed_refunds[currency] = unkeyed_refunds.get(currency, 0) + micros
    parts: dict[str, dict[str, Any]] = {
        "orders": orders,
        "refunds": refunds,
        "unkeyed_orders": unkeyed_orders,
        "unkeyed_refunds": unkeyed_refunds,
    }
    return {name: dict(sorted(part.items())) for name, part in parts.items() if part}


def _order_rank(value: Any) -> tuple[int, str]:
    currency, micros = value
    return micros, currency


def _refund_rank(refund: int | None) -> tuple[int, int]:
    return (1, 0) if refund is None else (0, refund)


def _derive(out: dict[str, Any]) -> dict[str, Any]:
    """The fields that follow from the others: order totals from the ledger."""
    out.pop("orders", None)
    ledger = as_mapping(out.get("ledger"))
    orders: dict[str, dict[str, int]] = {}
    for currency, (count, micros) in as_mapping(ledger.get("unkeyed_orders")).items():
        have = orders.setdefault(currency, {"count": 0, "micros": 0})
        have["count"] += count
        have["micros"] += micros
    refunds = as_mapping(ledger.get("refunds"))
    for order_id, (currency, micros) in as_mapping(ledger.get("orders")).items():
        have = orders.setdefault(currency, {"count": 0, "micros": 0})
        have["count"] += 1
        have["micros"] += micros
        if order_id in refunds:
            refund = refunds[order_id]
            have["micros"] -= micros if refund is None else max(0, min(refund, micros))
    for currency, micros in as_mapping(ledger.get("unkeyed_refunds")).items():
        if currency in orders:
            orders[currency]["micros"] = max(0, orders[currency]["micros"] - micros)
    orders = {c: o for c, o in orders.items() if o["count"] > 0}
    if orders:
        currency = min(orders, key=lambda c: (-orders[c]["count"], c))
        main = orders[currency]
        out["orders"] = dict(sorted(orders.items()))
        out["order_count"] = sum(o["count"] for o in orders.values())
        out["currency"] = currency
        out["total_revenue"] = main["micros"] / _MICROS
        out["average_order_value"] = round(main["micros"] / main["count"] / _MICROS, 6)
    else:
        for name in ("order_count", "currency", "total_revenue", "average_order_value"):
            out.pop(name, None)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _money(value: Any) -> int:
    """An amount in integer micro-units; anything that is not a number counts as 0."""
    if not _is_number(value):
        return 0
    number: float = value
    return round(number * _MICROS)


def _currency(value: Any) -> str:
    return value.strip().upper() if isinstance(value, str) and value.strip() else "USD"


def _order_id(value: Any) -> str | None:
    """A non-empty string (stripped) or an integer, as text; anything else: no order_id."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


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
