"""Which identifiers an event carries, normalized, with junk values blocked. Pure, no I/O.

Blocked values ("undefined", "null", "0", ...) are what broken tracking code sends for a
missing id; letting them link would merge strangers into one profile.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

USER_ID = "user_id"
ANONYMOUS_ID = "anonymous_id"

# Highest priority first: the profile of the first identifier found is the event's home.
PRIORITY: tuple[str, ...] = (USER_ID, ANONYMOUS_ID)

DEFAULT_BLOCKED = frozenset(
    {
        "",
        "undefined",
        "null",
        "none",
        "nil",
        "nan",
        "anonymous",
        "guest",
        "true",
        "false",
        "[object object]",
        "0",
        "-1",
    }
)
_ZEROS_AND_DASHES = re.compile(r"^[0-]*$")


@dataclass(frozen=True, order=True, slots=True)
class Identifier:
    type: str
    value: str

    def ref(self) -> str:
        return f"{self.type}:{self.value}"


def normalize(type_: str, raw: object) -> str | None:
    """The canonical spelling of an identifier value, or None when it must not link."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, int | float):
        raw = str(raw)
    if not isinstance(raw, str):
        return None
    value = raw.strip()
    if value.lower() in DEFAULT_BLOCKED or _ZEROS_AND_DASHES.match(value):
        return None
    return value


def identifiers_of(event: Mapping[str, Any]) -> list[Identifier]:
    """The event's identifiers in priority order (duplicates removed)."""
    found = [
        (USER_ID, event.get("userId")),
        (ANONYMOUS_ID, event.get("anonymousId")),
    ]
    return _unique(Identifier(t, v) for t, raw in found if (v := normalize(t, raw)) is not None)


def parse_ref(ref: str) -> Identifier | None:
    """``type:value`` as used by the API, normalized like ingestion; None if not that form."""
    type_, sep, raw = ref.partition(":")
    if not sep or not type_:
        return None
    value = normalize(type_, raw)
    return None if value is None else Identifier(type_, value)


def _unique(ids: Iterable[Identifier]) -> list[Identifier]:
    return list(dict.fromkeys(ids))
