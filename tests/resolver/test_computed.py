"""Computed traits: each field's rule, and one result for any order or grouping."""

from __future__ import annotations

from functools import reduce
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.resolver import computed
from tests.resolver.oracle import computed_diff, expected_computed


def fold(events: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    return reduce(computed.merge, (computed.of_event(e, ts) for e, ts in events), {})


def ts(day: int) -> str:
    return f"2024-02-{day:02d}T00:00:00.000000Z"


def order(revenue: Any, currency: str | None = "EUR", **extra: Any) -> dict[str, Any]:
    properties = {"revenue": revenue, **({"currency": currency} if currency else {}), **extra}
    return {
        "type": "track",
        "event": "Order Completed",
        "channel": "purchase",
        "properties": properties,
    }


def refund(order_id: Any = None, amount: Any = None, **extra: Any) -> dict[str, Any]:
    properties = {
        **({"order_id": order_id} if order_id is not None else {}),
        **({"total": amount} if amount is not None else {}),
        **extra,
    }
    return {
        "type": "track",
        "event": "Order Refunded",
        "channel": "purchase",
        "properties": properties,
    }


def money(result: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        result.get(k)
        for k in ("orders", "order_count", "currency", "total_revenue", "average_order_value")
    )


def test_every_field() -> None:
    events: list[tuple[dict[str, Any], str]] = [
        (
            {
                "type": "page",
                "channel": "website",
                "messageId": "m1",
                "context": {
                    "campaign": {"source": "google", "medium": "cpc", "name": "spring"},
                    "page": {"referrer": "https://google.com/"},
                },
            },
            ts(3),
        ),
        (
            {
                "type": "page",
                "channel": "website",
                "messageId": "m2",
                "context": {"page": {"referrer": "https://news.example/"}},
            },
            ts(9),
        ),
        ({"type": "track", "event": "Email Opened", "channel": "email"}, ts(4)),
        ({"type": "track", "event": " email link clicked ", "channel": "email"}, ts(5)),
        ({"type": "track", "event": "Email Bounced", "channel": "email"}, ts(6)),
        (order(10.1), ts(7)),
        (order(19.9), ts(8)),
        (order(5, "usd"), ts(2)),
        (order("lots"), ts(1)),  # not a number: an order, no revenue
    ]
    result = fold(events)
    assert result == {
        "event_count": 9,
        "first_seen": ts(1),
        "last_seen": ts(9),
        "page_views": 2,
        "email_opens": 1,
        "email_clicks": 1,
        "email_bounces": 1,
        "channels": ["email", "purchase", "website"],
        "ledger": {"unkeyed_orders": {"EUR": [3, 30_000_000], "USD": [1, 5_000_000]}},
        "orders": {
            "EUR": {"count": 3, "micros": 30_000_000},
            "USD": {"count": 1, "micros": 5_000_000},
        },
        "order_count": 4,
        "last_order_at": ts(8),
        "currency": "EUR",
        "total_revenue": 30.0,
        "average_order_value": 10.0,
        "first_touch": {
            "at": ts(3),
            "message_id": "m1",
            "source": "google",
            "medium": "cpc",
            "campaign": "spring",
            "referrer": "https://google.com/",
        },
        "last_touch": {
            "at": ts(9),
            "message_id": "m2",
            "source": None,
            "medium": None,
            "campaign": None,
            "referrer": "https://news.example/",
        },
    }


def test_total_falls_back_and_currency_defaults_to_usd() -> None:
    event = {"type": "track", "event": "Order Completed", "properties": {"total": 12.5}}
    assert fold([(event, ts(1))])["orders"] == {"USD": {"count": 1, "micros": 12_500_000}}


def test_an_order_reported_twice_counts_once() -> None:
    events = [
        (
            order(
                20,
                order_id="o1",
            ),
            ts(1),
        ),
        (order(20, order_id=" o1 "), ts(3)),  # the same order, another messageId
        (order(10, order_id="o2"), ts(2)),
    ]
    result = fold(events)
    assert result["ledger"] == {"orders": {"o1": ["EUR", 20_000_000], "o2": ["EUR", 10_000_000]}}
    assert money(result) == (
        {"EUR": {"count": 2, "micros": 30_000_000}},
        2,
        "EUR",
        30.0,
        15.0,
    )
    assert result["last_order_at"] == ts(3)


def test_conflicting_reports_of_one_order_keep_the_largest() -> None:
    a = computed.of_event(order(20, order_id=7), ts(1))  # an integer order_id is its text
    b = computed.of_event(order("n/a", order_id="7"), ts(2))
    c = computed.of_event(order(20, "USD", order_id="7"), ts(3))
    for result in (computed.merge(a, b), computed.merge(b, a)):
        assert result["ledger"]["orders"] == {"7": ["EUR", 20_000_000]}
    for result in (
        computed.merge(computed.merge(a, b), c),
        computed.merge(c, computed.merge(b, a)),
    ):
        assert result["ledger"]["orders"] == {"7": ["USD", 20_000_000]}
        assert result["order_count"] == 1


def test_a_refund_reduces_revenue_once() -> None:
    events = [
        (order(30, order_id="o1"), ts(1)),
        (order(10, order_id="o2"), ts(2)),
        (refund("o1", 5), ts(3)),
        (refund("o1", 5), ts(4)),  # reported again: once
    ]
    result = fold(events)
    assert result["ledger"]["refunds"] == {"o1": 5_000_000}
    assert money(result) == ({"EUR": {"count": 2, "micros": 35_000_000}}, 2, "EUR", 35.0, 17.5)


def test_a_refund_without_amount_refunds_the_whole_order_in_its_currency() -> None:
    events = [
        (order(30, "usd", order_id="o1"), ts(1)),
        (order(12, "usd", order_id="o2"), ts(2)),
        (refund("o1", None, currency="EUR"), ts(3)),  # applies in the order's currency
        (refund("o1", 4), ts(4)),  # a full refund is the largest
    ]
    result = fold(events)
    assert result["ledger"]["refunds"] == {"o1": None}
    assert money(result) == ({"USD": {"count": 2, "micros": 12_000_000}}, 2, "USD", 12.0, 6.0)


def test_a_refund_is_capped_at_its_order_and_waits_for_it() -> None:
    early = fold([(refund("o1", 99), ts(1))])
    assert early["ledger"] == {"refunds": {"o1": 99_000_000}}
    assert "orders" not in early and "order_count" not in early and "total_revenue" not in early
    result = computed.merge(early, computed.of_event(order(30, order_id="o1"), ts(2)))
    assert money(result) == ({"EUR": {"count": 1, "micros": 0}}, 1, "EUR", 0.0, 0.0)


def test_a_refund_without_order_id() -> None:
    events = [
        (order(30), ts(1)),
        (order(10, "USD"), ts(2)),
        (refund(None, 8, currency="eur"), ts(3)),
        (refund(None, 8, currency="eur"), ts(4)),  # no order_id: each report counts
        (refund(None, 50, currency="USD"), ts(5)),  # never below 0
        (refund(None, None), ts(6)),  # nothing to refund
    ]
    result = fold(events)
    assert result["ledger"]["unkeyed_refunds"] == {"EUR": 16_000_000, "USD": 50_000_000}
    assert result["orders"] == {
        "EUR": {"count": 1, "micros": 14_000_000},
        "USD": {"count": 1, "micros": 0},
    }
    assert (result["currency"], result["total_revenue"]) == ("EUR", 14.0)


def test_a_value_from_before_the_ledger_merges_as_unkeyed_orders() -> None:
    old = {"event_count": 2, "orders": {"EUR": {"count": 2, "micros": 30_000_000}}}
    result = computed.merge(old, computed.of_event(order(10, order_id="o1"), ts(1)))
    assert result["ledger"] == {
        "orders": {"o1": ["EUR", 10_000_000]},
        "unkeyed_orders": {"EUR": [2, 30_000_000]},
    }
    assert money(result) == ({"EUR": {"count": 3, "micros": 40_000_000}}, 3, "EUR", 40.0, 13.333333)


_order_id = st.sampled_from([None, "o1", "o2", "o3"])
_amount = st.floats(0, 1000, allow_nan=False).map(lambda f: round(f, 2))
_event = st.one_of(
    st.builds(lambda c: {"type": "page", "channel": c}, st.sampled_from(["website", "other"])),
    st.builds(
        lambda n: {"type": "track", "event": n, "channel": "email"},
        st.sampled_from(["Email Opened", "Email Bounced", "Signed Up"]),
    ),
    st.builds(
        lambda r, c, o: order(r, c, **({"order_id": o} if o else {})),
        _amount,
        st.sampled_from(["EUR", "USD", None]),
        _order_id,
    ),
    st.builds(
        lambda o, a, c: refund(o, a, **({"currency": c} if c else {})),
        _order_id,
        st.one_of(st.none(), _amount),
        st.sampled_from(["EUR", "USD", None]),
    ),
    st.builds(
        lambda s, m: {"type": "page", "messageId": m, "context": {"campaign": {"source": s}}},
        st.sampled_from(["a", "b"]),
        st.sampled_from(["m1", "m2", "m3"]),
    ),
)


@given(st.lists(st.tuples(_event, st.integers(1, 28).map(ts)), max_size=16), st.randoms())
def test_any_order_and_grouping_gives_the_same_result(events: list[Any], rnd: Any) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(events))
    assert (
        fold(events) == fold(shuffled) == computed.merge(fold(shuffled[:cut]), fold(shuffled[cut:]))
    )
    # a report arriving twice (another messageId) changes nothing for keyed orders/refunds
    keyed = [(e, t) for e, t in events if (e.get("properties") or {}).get("order_id")]
    twice = fold(events + keyed)
    assert money(twice) == money(fold(events))
    assert twice.get("ledger") == fold(events).get("ledger")


@given(st.lists(st.tuples(_event, st.integers(1, 28).map(ts)), min_size=1, max_size=16))
def test_the_fold_agrees_with_the_oracle(events: list[Any]) -> None:
    """The independent oracle (definitions, not a fold) reaches the same numbers."""
    # distinct messageIds: the oracle breaks touch ties by time and messageId only
    unique = [({**e, "messageId": f"m{i}"}, t) for i, (e, t) in enumerate(events)]
    stamped = [{**e, "timestamp": t} for e, t in unique]
    assert computed_diff(fold(unique), expected_computed(stamped)) == {}
