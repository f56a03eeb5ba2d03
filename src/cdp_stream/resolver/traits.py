"""Trait merging that gives the same profile whatever order events arrive in. Pure, no I/O.

A profile's trait state keeps, per trait, the value and the timestamp of the event that
set it, in two maps: ``set`` (the newest event wins) and ``once`` (set-once traits from
``context.traits_set_once``: the oldest wins). Equal timestamps are settled by the values'
JSON (``set`` keeps the larger, ``once`` the smaller), so the outcome never depends on
arrival order. The traits a profile shows are ``once`` overlaid by ``set``.

Like computed traits, folding an event and merging two profiles are one operation:
:func:`merge` of two states, commutative and associative.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from cdp_stream.resolver import as_mapping

# {"set": {name: [ts, value]}, "once": {name: [ts, value]}}
TraitState = dict[str, dict[str, list[Any]]]


def of_event(event: Mapping[str, Any], ts: str) -> TraitState:
    """The trait state of a profile that has seen only ``event`` (stamped ``ts``)."""
    context = event.get("context") or {}
    incoming = dict(as_mapping(context.get("traits")))
    if event.get("type") == "identify":
        incoming.update(as_mapping(event.get("traits")))
    once = as_mapping(context.get("traits_set_once"))
    return {
        "set": {k: [ts, v] for k, v in incoming.items()},
        "once": {k: [ts, v] for k, v in once.items()},
    }


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> TraitState:
    return {
        "set": _pick(a.get("set", {}), b.get("set", {}), newest=True),
        "once": _pick(a.get("once", {}), b.get("once", {}), newest=False),
    }


def view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The traits as the profile shows them."""
    shown = {k: v for k, (_, v) in state.get("once", {}).items()}
    shown.update({k: v for k, (_, v) in state.get("set", {}).items()})
    return dict(sorted(shown.items()))


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The shown traits whose value differs between two views."""
    return {k: v for k, v in after.items() if k not in before or before[k] != v}


def _pick(
    a: Mapping[str, list[Any]], b: Mapping[str, list[Any]], *, newest: bool
) -> dict[str, list[Any]]:
    out = dict(a)
    for name, entry in b.items():
        have = out.get(name)
        if have is None:
            out[name] = entry
            continue
        if (_order(entry) > _order(have)) == newest and _order(entry) != _order(have):
            out[name] = entry
    return out


def _order(entry: list[Any]) -> tuple[str, bytes]:
    ts, value = entry
    return ts, orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
