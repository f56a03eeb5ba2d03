"""Trait merging that gives the same profile whatever order events arrive in. Pure, no I/O.

Every trait remembers the timestamp of the event that set it; a value from an older
event never overwrites one from a newer event. Equal timestamps are settled by comparing
the values' JSON, so the outcome still does not depend on arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def merge_traits(
    traits: dict[str, Any], trait_ts: dict[str, str], incoming: Mapping[str, Any], ts: str
) -> dict[str, Any]:
    """Apply ``incoming`` traits stamped ``ts`` (ISO-8601 UTC, fixed width) in place.

    Returns the traits that changed value.
    """
    changed: dict[str, Any] = {}
    for name, value in incoming.items():
        current_ts = trait_ts.get(name)
        if current_ts is not None:
            if ts < current_ts:
                continue
            if ts == current_ts and _tiebreak(value) <= _tiebreak(traits.get(name)):
                continue
        trait_ts[name] = ts
        if traits.get(name, _MISSING) != value:
            traits[name] = value
            changed[name] = value
    return changed


_MISSING = object()


def _tiebreak(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
