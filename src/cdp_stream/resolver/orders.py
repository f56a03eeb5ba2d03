"""Orders: what one purchase event reports, and a profile's money fields from the reports.

Every ``Order Completed`` / ``Order Refunded`` event is one row of the ``orders`` table
(``fact_of`` reads it; amounts in integer micro-units, so sums are exact in any order;
currency upper-cased, default USD), attached to a profile as the event is. The profile
keeps only totals (``computed.ORDER_FIELDS``), recomputed by
``resolver.repository.order_totals`` from its rows whenever it gets a report or a merge: a
profile with thousands of orders stays a small row, and each profile update stays small.
Pure, no I/O.

The rules the totals follow (the SQL in ``resolver.repository.order_totals`` implements them):

* an order with an ``order_id`` (a non-empty string, stripped, or an integer) counts once
  however many times (by whatever messageIds) it is reported; reports that disagree keep
  the largest ``(micros, currency)``. The amount is ``properties.revenue``, else
  ``properties.total`` (not a number: 0). Orders without an order_id count each report.
* a refund with an order_id: reports of one order's refund do not add up, the largest
  counts (``null``, no amount, is a full refund and the largest), so report the amount
  refunded so far. It applies to its order in the order's currency (the refund's own
  currency is ignored), capped at the order's amount; until the order is seen it waits
  and changes nothing. A refund without an order_id but with an amount reduces its
  currency's revenue, never below 0; without an amount there is nothing to refund.
* ``orders``: per currency with orders, ``{"count", "micros"}``: distinct orders and their
  revenue net of refunds; ``order_count`` (all currencies; a refunded order still counts)
  and for the profile's ``currency`` (the one with most orders, then alphabetical)
  ``total_revenue`` (net) and ``average_order_value`` (net revenue / orders).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cdp_stream.event_names import ORDER_COMPLETED, ORDER_REFUNDED, name_key
from cdp_stream.payload import as_mapping

_MICROS = 1_000_000
_COMPLETED = name_key(ORDER_COMPLETED)
_REPORTS = (_COMPLETED, name_key(ORDER_REFUNDED))


@dataclass(frozen=True, slots=True)
class Fact:
    """One order report: ``order`` (completed) or ``refund``; ``micros`` None only for a
    refund without an amount (a full refund)."""

    kind: Literal["order", "refund"]
    order_id: str | None
    currency: str
    micros: int | None


def fact_of(event: Mapping[str, Any]) -> Fact | None:
    """The order report an event makes, or None (not a purchase event, or a refund with
    neither an order_id nor an amount: nothing to refund)."""
    name = event.get("event")
    if event.get("type") != "track" or not isinstance(name, str):
        return None
    lowered = name_key(name)
    if lowered not in _REPORTS:
        return None
    properties = as_mapping(event.get("properties"))
    amount = properties.get("revenue", properties.get("total"))
    currency = _currency(properties.get("currency"))
    order_id = _order_id(properties.get("order_id"))
    if lowered == _COMPLETED:
        return Fact("order", order_id, currency, _money(amount))
    if _is_number(amount):
        return Fact("refund", order_id, currency, abs(_money(amount)))
    return Fact("refund", order_id, currency, None) if order_id is not None else None


def fields(totals: Iterable[tuple[str, int, int]]) -> dict[str, Any]:
    """The money fields from per-currency ``(currency, orders, net micros)``; empty
    without orders."""
    orders = {c: {"count": n, "micros": m} for c, n, m in sorted(totals) if n > 0}
    if not orders:
        return {}
    currency = min(orders, key=lambda c: (-orders[c]["count"], c))
    main = orders[currency]
    return {
        "orders": orders,
        "order_count": sum(o["count"] for o in orders.values()),
        "currency": currency,
        "total_revenue": main["micros"] / _MICROS,
        "average_order_value": round(main["micros"] / main["count"] / _MICROS, 6),
    }


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
