"""Which events become CRM interactions, and what each records
(:mod:`cdp_stream.activation.crm.interactions`): pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cdp_stream.activation.crm import interactions as crm
from tests.support import stored_event

SOURCE = "src_crm_test"


def ev(type_: str, ts: str, **fields: Any) -> dict[str, Any]:
    return stored_event(SOURCE, type_, ts, **fields)


def track(name: str, ts: str, **fields: Any) -> dict[str, Any]:
    return ev("track", ts, event=name, **fields)


def at(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/pricing", True),
        ("/pricing/", True),
        ("/Pricing/Teams", True),
        ("/pricing?plan=pro", True),
        ("/pricing-old", False),
        ("/blog/pricing", False),
        ("/demo/book", True),
        ("/demo", False),  # "/demo/" matches what lies below it only
        ("/", False),
    ],
)
def test_key_pages_match_whole_segments(path: str, matches: bool) -> None:
    assert crm.is_key_page(path, ["/pricing", "/demo/", ""]) is matches


def test_interaction_of_each_kind() -> None:
    ts = "2024-03-01T10:00:00Z"
    email = crm.interaction_of(
        track(
            "EMAIL OPENED ",
            ts,
            properties={"campaign_name": "Spring", "email_subject": "Hi", "email_id": 7},
        ),
        [],
    )
    assert email == crm.Interaction(
        "email_opened", at(ts), {"campaign": "Spring", "subject": "Hi", "email_id": 7}
    )
    for name, kind in [
        ("Email Sent", "email_sent"),
        ("Email Delivered", "email_delivered"),
        ("Email Link Clicked", "email_link_clicked"),
        ("Email Bounced", "email_bounced"),
        ("Unsubscribed", "email_unsubscribed"),
        ("Email Marked as Spam", "email_marked_as_spam"),
        ("Form Submitted", "form_submitted"),
        ("signed up", "signed_up"),
        ("Order Completed", "order_completed"),
        ("Order Refunded", "order_refunded"),
    ]:
        found = crm.interaction_of(track(name, ts), [])
        assert found is not None and found.kind == kind, name
    order = crm.interaction_of(
        track(
            "Order Completed",
            ts,
            properties={"order_id": "o1", "total": 20, "products": [{"sku": "s"}]},
        ),
        [],
    )
    assert order is not None
    assert order.details == {
        "order_id": "o1",
        "amount": 20,
        "currency": "USD",
        "items": [{"sku": "s"}],
    }
    assert crm.interaction_of(track("Product Viewed", ts), ["/"]) is None
    assert crm.interaction_of(ev("identify", ts), ["/"]) is None
    assert crm.interaction_of(ev("page", ts), ["/"]) is None  # no path at all
    page = crm.interaction_of(
        ev("page", ts, name="Pricing", properties={"path": "/pricing", "title": "Plans"}),
        ["/pricing"],
    )
    assert page == crm.Interaction(
        "page_viewed", at(ts), {"path": "/pricing", "title": "Plans", "name": "Pricing"}
    )
