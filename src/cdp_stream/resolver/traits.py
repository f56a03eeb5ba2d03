"""Trait merging that gives the same profile whatever order events arrive in. Pure, no I/O.

A profile's trait state keeps, per trait, the value and the timestamp of the event that
set it, in two maps: ``set`` (the newest event wins) and ``once`` (set-once traits from
``context.traits_set_once``: the oldest wins). Equal timestamps are settled by the values'
JSON (``set`` keeps the larger, ``once`` the smaller), so the outcome never depends on
arrival order. The traits a profile shows are ``once`` overlaid by ``set``.

Like computed traits, folding an event and merging two profiles are one operation:
:func:`merge` of two states, commutative and associative; :func:`fold` is the same in
place (the resolver folds a batch's events once per profile, not a copy per event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from cdp_stream.payload import as_mapping

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
    out: TraitState = {"set": dict(a.get("set", {})), "once": dict(a.get("once", {}))}
    fold(out, b)
    return out


def fold(into: TraitState, part: Mapping[str, Any]) -> None:
    """Merge ``part`` into ``into`` in place (``into``'s maps are changed, not copied)."""
    for key, newest in (("set", True), ("once", False)):
        entries = part.get(key)
        if entries:
            _pick(into.setdefault(key, {}), entries, newest=newest)


def view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The traits as the profile shows them."""
    shown = {k: v for k, (_, v) in state.get("once", {}).items()}
    shown.update({k: v for k, (_, v) in state.get("set", {}).items()})
    return dict(sorted(shown.items()))


def changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The shown traits (in name order) whose value differs between state ``before`` and
    a state ``after`` folded from it (:func:`merge`, :func:`fold`: entries are added or
    replaced, never removed). Neither view is built: only the names whose entry was
    replaced or added can show a new value, and a profile's batch touches few of them."""
    b_set, b_once = before.get("set", {}), before.get("once", {})
    a_set, a_once = after.get("set", {}), after.get("once", {})
    touched = {k for k, e in a_set.items() if b_set.get(k) is not e}
    touched.update(k for k, e in a_once.items() if b_once.get(k) is not e)
    out = {}
    for k in sorted(touched):
        now = (a_set[k] if k in a_set else a_once[k])[1]
        was = b_set.get(k) or b_once.get(k)
        if was is None or was[1] != now:
            out[k] = now
    return out


def _pick(into: dict[str, list[Any]], b: Mapping[str, list[Any]], *, newest: bool) -> None:
    for name, entry in b.items():
        have = into.get(name)
        if have is None or _wins(entry, have, newest=newest):
            into[name] = entry


def _wins(entry: list[Any], have: list[Any], *, newest: bool) -> bool:
    """Whether ``entry`` replaces ``have``: the newer (``once``: older) timestamp, on a
    tie the larger (smaller) JSON; equal ones keep ``have``. The JSON only on a tie."""
    ts: str = entry[0]
    other: str = have[0]
    if ts != other:
        return (ts > other) == newest
    ours, theirs = _json(entry[1]), _json(have[1])
    return ours != theirs and (ours > theirs) == newest


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
