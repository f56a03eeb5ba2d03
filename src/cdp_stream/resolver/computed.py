"""Computed traits, folded in commutatively so arrival order never matters. Pure, no I/O.

Counts add, first/last keep the min/max timestamp: replaying the same set of events in
any order yields the same values.
"""

from __future__ import annotations

from typing import Any


def fold_event(computed: dict[str, Any], event: dict[str, Any], ts: str) -> None:
    """Fold one (new, never seen before) event stamped ``ts`` into ``computed`` in place."""
    computed["event_count"] = computed.get("event_count", 0) + 1
    first, last = computed.get("first_seen"), computed.get("last_seen")
    computed["first_seen"] = ts if first is None or ts < first else first
    computed["last_seen"] = ts if last is None or ts > last else last
