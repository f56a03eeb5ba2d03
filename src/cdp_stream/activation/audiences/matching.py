"""Who should be in which audience, and what changes: the pure part of membership.

An audience is a stored rule (``rules.py``); given the canonical profiles as they are, their
recent events and ``now``, :func:`wanted` says which (audience, profile) pairs match and
:func:`diff` which enter and which exit against the current members. No I/O: the
membership paths (``membership.py``, ``backfill.py``) read and write around it.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from cdp_stream.activation.audiences.rules import EventView, Rule, evaluate, parse_rule

log = logging.getLogger(__name__)

Member = tuple[uuid.UUID, uuid.UUID]  # (audience id, profile id)


@dataclass(frozen=True)
class Audience:
    id: uuid.UUID
    rule: Rule


@functools.lru_cache(maxsize=1024)
def _parsed(rule_json: bytes) -> Rule:
    """Rules are parsed once per distinct text, not once per micro-batch."""
    return parse_rule(orjson.loads(rule_json))


def audiences_of_rows(rows: Iterable[tuple[uuid.UUID, Any]]) -> list[Audience]:
    """Stored (id, rule JSON) rows as audiences; one whose rule no longer parses is
    logged and left out (validated on creation: only a hand-edited row gets here)."""
    found = []
    for audience_id, rule in rows:
        try:
            found.append(Audience(audience_id, _parsed(orjson.dumps(rule))))
        except ValueError:
            log.error("audience %s has an invalid rule; skipped", audience_id, exc_info=True)
    return found


def wanted(
    chosen: Sequence[Audience],
    profiles: Mapping[uuid.UUID, Mapping[str, Any]],
    timeline: Mapping[uuid.UUID, list[EventView]],
    now: datetime,
) -> set[Member]:
    """The pairs whose rule holds now: ``profiles`` are the canonical ones
    (``{"traits", "computed"}``), ``timeline`` their events the rules may count."""
    return {
        (a.id, pid)
        for pid, profile in profiles.items()
        for a in chosen
        if evaluate(a.rule, profile, timeline.get(pid, []), now)
    }


def diff(want: set[Member], current: set[Member]) -> tuple[list[Member], list[Member]]:
    """(entering, leaving), each in order (so concurrent writers lock rows alike)."""
    return sorted(want - current), sorted(current - want)
