"""The names of the computed traits (``profiles.computed``): the one list the resolver
writes by (``resolver/computed.py``, ``resolver/orders.py``) and audience rules accept
(``activation/audiences/rules.py``), so the two cannot drift apart. What each holds and
how it is merged: docs/computed-traits.md.
"""

from __future__ import annotations

# Counted per event (``resolver/computed.py``): absent until the first event that counts.
EVENT_COUNTERS = ("event_count", "page_views", "email_opens", "email_clicks", "email_bounces")
# Totals of the order ledger (``resolver/orders.py``), recomputed, never merged.
ORDER_FIELDS = ("orders", "order_count", "currency", "total_revenue", "average_order_value")
# Every computed trait, in the order the documentation lists them.
NAMES = (
    "event_count",
    "first_seen",
    "last_seen",
    "page_views",
    "email_opens",
    "email_clicks",
    "email_bounces",
    "orders",
    "order_count",
    "last_order_at",
    "currency",
    "total_revenue",
    "average_order_value",
    "first_touch",
    "last_touch",
    "channels",
)
# The counters a rule reads as 0 while absent.
COUNTERS = frozenset((*EVENT_COUNTERS, "order_count"))
