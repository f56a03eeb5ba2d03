"""Orders: each report a row of ``orders``, the profile's money fields their totals.

Against the real Postgres server, through ``apply_batch``: the totals are summed by SQL
(``resolver.repository.order_totals``), so the rules are shown where they run. Every case is
stored in one batch and again split over batches in reverse order, with the same result.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import reads
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import orders as orders_table
from cdp_stream.resolver import computed, orders
from cdp_stream.resolver.batch import apply_batch
from cdp_stream.settings import Settings

RULES = IdentityRules.from_settings(Settings())


def ts(day: int) -> str:
    return f"2024-02-{day:02d}T00:00:00.000000Z"


def order(revenue: Any, currency: str | None = "EUR", **extra: Any) -> dict[str, Any]:
    properties = {"revenue": revenue, **({"currency": currency} if currency else {}), **extra}
    return {"type": "track", "event": "Order Completed", "properties": properties}


def refund(order_id: Any = None, amount: Any = None, **extra: Any) -> dict[str, Any]:
    properties = {
        **({"order_id": order_id} if order_id is not None else {}),
        **({"total": amount} if amount is not None else {}),
        **extra,
    }
    return {"type": "track", "event": "Order Refunded", "properties": properties}


def money(computed: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(computed.get(k) for k in ("orders", "order_count", "currency", "total_revenue"))


async def stored(engine: AsyncEngine, calls: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The computed traits of one person after ``calls``, stored in one batch; checked
    equal to storing them one batch per call, newest first, for another person."""
    results = []
    for split in (False, True):
        user = f"u-{uuid.uuid4().hex[:10]}"
        events = [
            {
                **call,
                "userId": user,
                "messageId": f"{user}-{i}",
                "sourceId": "src_test",
                "timestamp": at,
                "receivedAt": at,
                "channel": "purchase",
            }
            for i, (call, at) in enumerate(calls)
        ]
        for batch in [[e] for e in reversed(events)] if split else [events]:
            async with engine.begin() as conn:
                await apply_batch(conn, batch, RULES)
        async with engine.connect() as conn:
            pid = await repo.profile_for_identifier(conn, Identifier("user_id", user))
            assert pid is not None
            profile = await reads.read_profile(conn, pid)
        assert profile is not None
        results.append(profile.computed)
    assert results[0] == results[1]
    return results[0]


async def test_orders_per_currency(engine: AsyncEngine) -> None:
    result = await stored(
        engine,
        [
            (order(10.1), ts(7)),
            (order(19.9), ts(8)),
            (order(5, "usd"), ts(2)),
            (order("lots"), ts(1)),  # not a number: an order, no revenue
            ({"type": "track", "event": "Order Completed", "properties": {"total": 12.5}}, ts(3)),
        ],
    )
    assert money(result) == (
        {"EUR": {"count": 3, "micros": 30_000_000}, "USD": {"count": 2, "micros": 17_500_000}},
        5,
        "EUR",
        30.0,
    )
    assert (result["average_order_value"], result["last_order_at"]) == (10.0, ts(8))


async def test_an_order_reported_twice_counts_once(engine: AsyncEngine) -> None:
    result = await stored(
        engine,
        [
            (order(20, order_id="o1"), ts(1)),
            (order(20, order_id=" o1 "), ts(3)),  # the same order, another messageId
            (order(10, order_id="o2"), ts(2)),
        ],
    )
    assert money(result) == ({"EUR": {"count": 2, "micros": 30_000_000}}, 2, "EUR", 30.0)
    assert result["average_order_value"] == 15.0


async def test_conflicting_reports_of_one_order_keep_the_largest(engine: AsyncEngine) -> None:
    result = await stored(
        engine,
        [
            (order(20, order_id=7), ts(1)),  # an integer order_id is its text
            (order("n/a", order_id="7"), ts(2)),
            (order(20, "USD", order_id="7"), ts(3)),  # (micros, currency): USD > EUR
        ],
    )
    assert money(result) == ({"USD": {"count": 1, "micros": 20_000_000}}, 1, "USD", 20.0)


async def test_a_refund_reduces_revenue_once(engine: AsyncEngine) -> None:
    result = await stored(
        engine,
        [
            (order(30, order_id="o1"), ts(1)),
            (order(10, order_id="o2"), ts(2)),
            (refund("o1", 5), ts(3)),
            (refund("o1", 5), ts(4)),  # reported again: once
        ],
    )
    assert money(result) == ({"EUR": {"count": 2, "micros": 35_000_000}}, 2, "EUR", 35.0)


async def test_a_refund_without_amount_refunds_the_whole_order(engine: AsyncEngine) -> None:
    result = await stored(
        engine,
        [
            (order(30, "usd", order_id="o1"), ts(1)),
            (order(12, "usd", order_id="o2"), ts(2)),
            (refund("o1", None, currency="EUR"), ts(3)),  # applies in the order's currency
            (refund("o1", 4), ts(4)),  # a full refund is the largest
        ],
    )
    assert money(result) == ({"USD": {"count": 2, "micros": 12_000_000}}, 2, "USD", 12.0)


async def test_a_refund_is_capped_at_its_order_and_waits_for_it(engine: AsyncEngine) -> None:
    early = await stored(engine, [(refund("o1", 99), ts(1))])
    assert money(early) == (None, None, None, None)
    result = await stored(engine, [(refund("o1", 99), ts(1)), (order(30, order_id="o1"), ts(2))])
    assert money(result) == ({"EUR": {"count": 1, "micros": 0}}, 1, "EUR", 0.0)


async def test_a_refund_without_order_id(engine: AsyncEngine) -> None:
    result = await stored(
        engine,
        [
            (order(30), ts(1)),
            (order(10, "USD"), ts(2)),
            (refund(None, 8, currency="eur"), ts(3)),
            (refund(None, 8, currency="eur"), ts(4)),  # no order_id: each report counts
            (refund(None, 50, currency="USD"), ts(5)),  # never below 0
            (refund(None, None), ts(6)),  # nothing to refund
        ],
    )
    assert money(result) == (
        {"EUR": {"count": 1, "micros": 14_000_000}, "USD": {"count": 1, "micros": 0}},
        2,
        "EUR",
        14.0,
    )


async def test_a_profile_holds_totals_not_its_orders(engine: AsyncEngine) -> None:
    """Each report is a row of ``orders``; the profile row has only the totals."""
    result = await stored(engine, [(order(i, order_id=f"o{i}"), ts(1)) for i in range(1, 41)])
    assert result["order_count"] == 40 and "ledger" not in result
    folded = {"event_count", "first_seen", "last_seen", "channels", "last_order_at"}
    assert set(result) == folded | set(computed.ORDER_FIELDS)
    async with engine.connect() as conn:
        rows = await conn.scalar(
            select(func.count()).select_from(orders_table).where(orders_table.c.order_id == "o40")
        )
    assert rows is not None and rows >= 2  # one per stored report (both people of stored())


def test_what_an_event_reports() -> None:
    assert orders.fact_of(order(1.5, " eur ", order_id=" x ")) == orders.Fact(
        "order", "x", "EUR", 1_500_000
    )
    assert orders.fact_of(refund("x", -2)) == orders.Fact("refund", "x", "USD", 2_000_000)
    assert orders.fact_of(refund("x")) == orders.Fact("refund", "x", "USD", None)
    assert orders.fact_of(refund()) is None  # no order_id, no amount: nothing to refund
    assert orders.fact_of({"type": "track", "event": "Signed Up"}) is None
    assert orders.fact_of({"type": "page", "event": "Order Completed"}) is None
