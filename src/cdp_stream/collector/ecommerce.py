"""The e-commerce spec's fields, checked where present: a reason to refuse, or None.

Applies to ``track`` events named (trimmed, any case) ``Order Completed``, ``Order
Refunded``, ``Checkout Started``, ``Product Viewed`` and ``Product Added``; any other
event passes. Nothing is required at the top level (a ``Product Viewed`` without
properties passes); what is there must have the spec's type:

* orders and checkouts: ``order_id`` a non-empty string; ``revenue``, ``total``,
  ``subtotal``, ``shipping``, ``tax``, ``discount`` finite numbers >= 0; ``currency``
  three ASCII letters (any case); ``products`` a list of products, each an object with a
  ``product_id`` (required there) and the product fields below;
* a product (the properties of ``Product Viewed`` / ``Product Added``, or an item of
  ``products``): ``product_id`` a non-empty string, ``price`` a finite number >= 0,
  ``quantity`` an integer >= 1; ``currency`` as above.

The reason names each field by path (``properties.products[1].quantity: ...``), up to
five, joined by ``; ``, as the collector's other reasons are. Pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from cdp_stream.event_names import ORDER_EVENTS, PRODUCT_EVENTS, name_key

MONEY_FIELDS = ("revenue", "total", "subtotal", "shipping", "tax", "discount")
MAX_REASONS = 5

_CURRENCY = re.compile(r"[A-Za-z]{3}")


def ecommerce_violation(event: Mapping[str, Any]) -> str | None:
    """Why ``event`` breaks the e-commerce spec, or None when it keeps to it (or is not
    one of its events)."""
    name = event.get("event")
    if event.get("type") != "track" or not isinstance(name, str):
        return None
    lowered = name_key(name)
    if lowered not in ORDER_EVENTS and lowered not in PRODUCT_EVENTS:
        return None
    properties = event.get("properties")
    if properties is None:
        return None
    if not isinstance(properties, Mapping):
        return "properties: must be an object"
    if lowered in ORDER_EVENTS:
        problems = list(_order(properties, "properties"))
    else:
        problems = list(_product(properties, "properties", product_id_required=False))
    return "; ".join(problems[:MAX_REASONS]) or None


def _order(props: Mapping[str, Any], path: str) -> Iterator[str]:
    if "order_id" in props:
        yield from _text(props["order_id"], f"{path}.order_id")
    for name in MONEY_FIELDS:
        if name in props:
            yield from _amount(props[name], f"{path}.{name}")
    if "currency" in props:
        yield from _currency(props["currency"], f"{path}.currency")
    if "products" in props:
        products = props["products"]
        if not isinstance(products, list):
            yield f"{path}.products: must be a list"
            return
        for i, product in enumerate(products):
            where = f"{path}.products[{i}]"
            if not isinstance(product, Mapping):
                yield f"{where}: must be an object"
            else:
                yield from _product(product, where, product_id_required=True)


def _product(props: Mapping[str, Any], path: str, *, product_id_required: bool) -> Iterator[str]:
    if "product_id" in props:
        yield from _text(props["product_id"], f"{path}.product_id")
    elif product_id_required:
        yield f"{path}.product_id: required"
    if "price" in props:
        yield from _amount(props["price"], f"{path}.price")
    if "quantity" in props:
        quantity = props["quantity"]
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
            yield f"{path}.quantity: must be a positive integer"
    if "currency" in props:
        yield from _currency(props["currency"], f"{path}.currency")


def _text(value: Any, path: str) -> Iterator[str]:
    if not isinstance(value, str) or not value.strip():
        yield f"{path}: must be a non-empty string"


def _amount(value: Any, path: str) -> Iterator[str]:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        yield f"{path}: must be a number >= 0"


def _currency(value: Any, path: str) -> Iterator[str]:
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        yield f"{path}: must be a 3-letter currency code"
