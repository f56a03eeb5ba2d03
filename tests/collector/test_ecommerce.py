"""The e-commerce spec's field checks: what passes, and the reason for what does not."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_stream.collector.ecommerce import ecommerce_violation


def track(name: str, properties: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "track", "event": name}
    if properties is not None:
        event["properties"] = properties
    return event


GOOD_ORDER = {
    "order_id": "o-1",
    "revenue": 25,
    "total": 27.5,
    "shipping": 2.5,
    "tax": 0,
    "discount": 0.0,
    "currency": "eur",
    "products": [
        {"product_id": "p1", "price": 10, "quantity": 2, "name": "Mug"},
        {"product_id": "p2", "price": 5.0},
    ],
}


@pytest.mark.parametrize(
    "event",
    [
        track("Order Completed", GOOD_ORDER),
        track(" order refunded ", {"order_id": "o-1"}),  # a full refund: no amount
        track("Checkout Started", {"products": []}),
        track("Product Viewed"),  # nothing required at the top level
        track("Product Added", {"product_id": "p1", "price": 3, "quantity": 1}),
        track("Signed Up", {"order_id": 7, "revenue": -1}),  # not an e-commerce event
        {"type": "page", "event": "Order Completed", "properties": {"revenue": "x"}},
        {"type": "track", "properties": {"revenue": "x"}},
    ],
)
def test_what_keeps_to_the_spec_passes(event: dict[str, Any]) -> None:
    assert ecommerce_violation(event) is None


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (track("Order Completed", []), "properties: must be an object"),
        (
            track("Order Completed", {"order_id": 7}),
            "properties.order_id: must be a non-empty string",
        ),
        (
            track("Order Refunded", {"order_id": " "}),
            "properties.order_id: must be a non-empty string",
        ),
        (track("Order Completed", {"revenue": -1}), "properties.revenue: must be a number >= 0"),
        (track("Order Completed", {"total": "12"}), "properties.total: must be a number >= 0"),
        (track("Checkout Started", {"total": True}), "properties.total: must be a number >= 0"),
        (
            track("Order Completed", {"total": float("inf")}),
            "properties.total: must be a number >= 0",
        ),
        (
            track("Order Completed", {"currency": "EURO"}),
            "properties.currency: must be a 3-letter currency code",
        ),
        (
            track("Order Completed", {"currency": None}),
            "properties.currency: must be a 3-letter currency code",
        ),
        (track("Order Completed", {"products": {}}), "properties.products: must be a list"),
        (
            track("Order Completed", {"products": ["p1"]}),
            "properties.products[0]: must be an object",
        ),
        (
            track("Order Completed", {"products": [{"product_id": "p1"}, {"price": 1}]}),
            "properties.products[1].product_id: required",
        ),
        (
            track("Order Completed", {"products": [{"product_id": "p1", "price": "1"}]}),
            "properties.products[0].price: must be a number >= 0",
        ),
        (
            track("Checkout Started", {"products": [{"product_id": "p", "quantity": 0}]}),
            "properties.products[0].quantity: must be a positive integer",
        ),
        (
            track("Product Added", {"quantity": 1.5}),
            "properties.quantity: must be a positive integer",
        ),
        (
            track("Product Viewed", {"product_id": ""}),
            "properties.product_id: must be a non-empty string",
        ),
        (
            track("Product Viewed", {"price": -0.01}),
            "properties.price: must be a number >= 0",
        ),
    ],
)
def test_each_broken_field_has_its_reason(event: dict[str, Any], reason: str) -> None:
    assert ecommerce_violation(event) == reason


def test_several_problems_are_joined_up_to_five() -> None:
    products = [{"quantity": -1} for _ in range(4)]
    event = track("Order Completed", {"order_id": 1, "revenue": -1, "products": products})
    reason = ecommerce_violation(event)
    assert reason is not None
    assert reason.split("; ") == [
        "properties.order_id: must be a non-empty string",
        "properties.revenue: must be a number >= 0",
        "properties.products[0].product_id: required",
        "properties.products[0].quantity: must be a positive integer",
        "properties.products[1].product_id: required",
    ]


def test_the_intake_rejects_an_order_that_breaks_the_spec() -> None:
    """Wired into the collector: the bad order is a per-event rejection, the good one passes."""
    from datetime import UTC, datetime

    from cdp_stream.collector.intake import intake
    from cdp_stream.identity import IdentityRules
    from cdp_stream.settings import Settings

    good = {
        "type": "track",
        "userId": "u",
        "event": "Order Completed",
        "properties": {"order_id": "o-1", "revenue": 10, "currency": "EUR"},
    }
    bad = {
        **good,
        "properties": {"order_id": "o-2", "products": [{"product_id": "p", "quantity": 0}]},
    }
    result = intake(
        {"batch": [good, bad]},
        "batch",
        settings=Settings(),
        rules=IdentityRules.from_settings(Settings()),
        source_id="src",
        received_at=datetime.now(UTC),
        ip=None,
        user_agent=None,
    )
    assert len(result.accepted) == 1
    assert [r.index for r in result.rejected] == [1]
    assert "quantity" in result.rejected[0].reason
