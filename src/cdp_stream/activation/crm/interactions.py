"""Which events a salesperson wants to see, and the interaction record each becomes: a key
page viewed, an email event, an order, a form submit or sign-up. Pure: the feed
(``feed.py``) stores them, once per source event. The rules: docs/crm.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cdp_stream.activation.crm._values import is_number, scalar, text
from cdp_stream.event_names import (
    EMAIL_BOUNCED,
    EMAIL_DELIVERED,
    EMAIL_EVENTS,
    EMAIL_LINK_CLICKED,
    EMAIL_MARKED_AS_SPAM,
    EMAIL_OPENED,
    EMAIL_SENT,
    FORM_SUBMITTED,
    ORDER_COMPLETED,
    ORDER_REFUNDED,
    SIGNED_UP,
    UNSUBSCRIBED,
    name_key,
)
from cdp_stream.payload import as_mapping
from cdp_stream.timestamps import event_time

_EMAIL_KINDS = {  # the spec's name (event_names.EMAIL_EVENTS) -> the interaction kind
    EMAIL_SENT: "email_sent",
    EMAIL_DELIVERED: "email_delivered",
    EMAIL_OPENED: "email_opened",
    EMAIL_LINK_CLICKED: "email_link_clicked",
    EMAIL_BOUNCED: "email_bounced",
    UNSUBSCRIBED: "email_unsubscribed",
    EMAIL_MARKED_AS_SPAM: "email_marked_as_spam",
}
_ORDER_KINDS = {
    name_key(ORDER_COMPLETED): "order_completed",
    name_key(ORDER_REFUNDED): "order_refunded",
}
# The events that make a contact a lead (by their compared name), and their kinds.
LEAD_KINDS = {name_key(FORM_SUBMITTED): "form_submitted", name_key(SIGNED_UP): "signed_up"}
_PAGE_KIND = "page_viewed"


@dataclass(frozen=True, slots=True)
class Interaction:
    kind: str
    occurred_at: datetime
    details: dict[str, Any]


def _first(mapping: Mapping[str, Any], *names: str) -> str | int | float | None:
    for name in names:
        found = scalar(mapping.get(name))
        if found is not None:
            return found
    return None


def _compact(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if v is not None}


def page_path(event: Mapping[str, Any]) -> str | None:
    """``context.page.path``, else ``properties.path``."""
    page = as_mapping(as_mapping(event.get("context")).get("page"))
    return text(page.get("path")) or text(as_mapping(event.get("properties")).get("path"))


def is_key_page(path: str, prefixes: Iterable[str]) -> bool:
    """Whole-segment prefix match, ignoring case and any query or fragment."""
    path = path.split("?", 1)[0].split("#", 1)[0].casefold()
    for prefix in prefixes:
        prefix = prefix.strip().casefold()
        if not prefix:
            continue
        if prefix.endswith("/"):
            if path.startswith(prefix):
                return True
        elif path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def interaction_of(event: Mapping[str, Any], key_pages: Sequence[str]) -> Interaction | None:
    """The CRM interaction an event is, or None when it is not worth a salesperson's eye."""
    props = as_mapping(event.get("properties"))
    context = as_mapping(event.get("context"))
    page = as_mapping(context.get("page"))
    kind: str | None = None
    details: dict[str, Any] = {}
    if event.get("type") == "page":
        path = page_path(event)
        if path is None or not is_key_page(path, key_pages):
            return None
        kind = _PAGE_KIND
        details = {
            "path": path,
            "url": _first(props, "url") or scalar(page.get("url")),
            "title": _first(props, "title") or scalar(page.get("title")),
            "name": scalar(event.get("name")),
            "referrer": _first(props, "referrer") or scalar(page.get("referrer")),
        }
    elif event.get("type") == "track" and isinstance(event.get("event"), str):
        name = name_key(event["event"])
        if name in EMAIL_EVENTS:
            kind = _EMAIL_KINDS[EMAIL_EVENTS[name]]
            details = {
                "campaign": _first(props, "campaign_name", "campaign"),
                "campaign_id": _first(props, "campaign_id"),
                "subject": _first(props, "email_subject", "subject"),
                "email_id": _first(props, "email_id"),
                "link_url": _first(props, "link_url"),
                "list": _first(props, "list_name", "list_id"),
            }
        elif name in _ORDER_KINDS:
            kind = _ORDER_KINDS[name]
            amount = next(
                (v for v in (props.get("revenue"), props.get("total")) if is_number(v)), None
            )
            currency = text(props.get("currency"))
            products = props.get("products")
            details = {
                "order_id": _first(props, "order_id", "orderId"),
                "amount": amount,
                "currency": currency.upper() if currency else ("USD" if amount else None),
                "items": [as_mapping(p) for p in products] if isinstance(products, list) else None,
            }
        elif name in LEAD_KINDS:
            kind = LEAD_KINDS[name]
            details = {
                "form_id": _first(props, "form_id", "formId"),
                "form_name": _first(props, "form_name", "formName", "form"),
                "method": _first(props, "method", "type"),
                "page_path": scalar(page.get("path")),
            }
    if kind is None:
        return None
    return Interaction(kind, event_time(event["timestamp"])[0], _compact(details))


def interaction_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored interaction as the webhook and the API show it (times as ISO 8601)."""
    return {
        "id": row["id"],
        "profile_id": str(row["profile_id"]),
        "source_id": row["source_id"],
        "message_id": row["message_id"],
        "kind": row["kind"],
        "occurred_at": row["occurred_at"].isoformat(),
        "details": row["details"],
    }
