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
        "last_order_at": ts(8),  # the money fields are summed from orders: test_orders.py
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


@given(st.lists(st.tuples(_event, st.integers(1, 28).map(ts)), min_size=1, max_size=16))
def test_the_fold_agrees_with_the_oracle(events: list[Any]) -> None:
    """The independent oracle (definitions, not a fold) reaches the same numbers."""
    # distinct messageIds: the oracle breaks touch ties by time and messageId only
    unique = [({**e, "messageId": f"m{i}"}, t) for i, (e, t) in enumerate(events)]
    stamped = [{**e, "timestamp": t} for e, t in unique]
    expected = expected_computed(stamped)
    money = {k: v for k, v in expected.items() if k not in computed.ORDER_FIELDS}
    assert computed_diff(fold(unique), money) == {}
