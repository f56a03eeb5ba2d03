"""Which identifiers an event carries, normalized, with junk values blocked. Pure, no I/O.

Blocked values ("undefined", "null", "0", ...) are what broken tracking code sends for a
missing id; letting them link would merge strangers into one profile. The rules (priority,
per-type limits, blocked values, the phone region) come from :class:`Settings`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import phonenumbers

from cdp_stream.payload import as_mapping
from cdp_stream.sealing import SuppressionKeys
from cdp_stream.settings import Settings

USER_ID = "user_id"
ANONYMOUS_ID = "anonymous_id"
EMAIL = "email"
PHONE = "phone"
DEVICE_ID = "device_id"
ADVERTISING_ID = "advertising_id"
BUILT_IN = (USER_ID, EMAIL, PHONE, ANONYMOUS_ID, DEVICE_ID, ADVERTISING_ID)


class Identifier(NamedTuple):
    """A (type, value) pair; a tuple, as the hot loops hash and compare thousands of them
    per batch (a frozen dataclass costs a Python call for each)."""

    type: str
    value: str

    def ref(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass(frozen=True)
class IdentityRules:
    """How identifiers are ranked, bounded and filtered."""

    priority: tuple[str, ...]
    limits: Mapping[str, int]
    default_limit: int
    blocked: frozenset[str]
    phone_region: str | None = None
    # How a deleted person's identifiers are sealed and recognized (a rule on identifiers,
    # and these rules reach every place that resolves them: the resolver and the API).
    suppression: SuppressionKeys = field(default_factory=SuppressionKeys)

    @classmethod
    def from_settings(cls, settings: Settings) -> IdentityRules:
        first = tuple(dict.fromkeys(settings.identity_priority))
        rest = tuple(t for t in BUILT_IN if t not in first)
        return cls(
            priority=first + rest,
            limits=dict(settings.identity_limits),
            default_limit=settings.identity_default_limit,
            blocked=frozenset(v.strip().lower() for v in settings.identity_blocked_values),
            phone_region=settings.phone_default_region,
            suppression=SuppressionKeys.from_settings(settings),
        )

    @functools.cached_property
    def _ranks(self) -> dict[str, int]:
        """Each configured type's place in ``priority``, looked up once per identifier of
        every event (the collector's and the resolver's hot paths)."""
        return {type_: n for n, type_ in enumerate(self.priority)}

    def rank(self, type_: str) -> tuple[int, str]:
        """Sort key: configured types in order, then custom types alphabetically."""
        n = self._ranks.get(type_)
        return (len(self.priority), type_) if n is None else (n, "")

    def limit(self, type_: str) -> int:
        return self.limits.get(type_, self.default_limit)

    def normalize(self, type_: str, raw: object) -> str | None:
        """The canonical spelling of an identifier value, or None when it must not link."""
        if not isinstance(raw, str):  # (strings first: they are nearly all, and on hot paths)
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                return None
            raw = str(raw)
        value = raw.strip()
        if not value.strip("0-") or value.lower() in self.blocked:  # only zeros and dashes
            return None
        if type_ == EMAIL:
            return value.lower()
        if type_ == PHONE:
            return _e164(value, self.phone_region)
        return value

    def identifiers_of(self, event: Mapping[str, Any]) -> list[Identifier]:
        """The event's usable identifiers, highest priority first, without repeats."""
        context = as_mapping(event.get("context"))
        traits = as_mapping(event.get("traits"))
        context_traits = as_mapping(context.get("traits"))
        device = as_mapping(context.get("device"))
        found: list[tuple[str, object]] = [
            (USER_ID, event.get("userId")),
            (ANONYMOUS_ID, event.get("anonymousId")),
            (EMAIL, traits.get("email")),
            (EMAIL, context_traits.get("email")),
            (PHONE, traits.get("phone")),
            (PHONE, context_traits.get("phone")),
            (DEVICE_ID, device.get("id")),
            (ADVERTISING_ID, device.get("advertisingId")),
        ]
        external = context.get("externalIds")
        for item in external if isinstance(external, list) else []:
            item = as_mapping(item)
            kind = item.get("type")
            if isinstance(kind, str) and kind.strip():
                found.append((kind.strip().lower(), item.get("id")))
        ids: dict[Identifier, None] = {}  # in order, without repeats
        for type_, raw in found:  # most are absent, and skipped before normalizing
            if raw is not None and (value := self.normalize(type_, raw)) is not None:
                ids[Identifier(type_, value)] = None
        return sorted(ids, key=self._order)

    def _order(self, ident: Identifier) -> tuple[tuple[int, str], str]:
        return self.rank(ident.type), ident.value

    def parse_ref(self, ref: str) -> Identifier | None:
        """``type:value`` as used by the API, normalized like ingestion; None if not that."""
        type_, sep, raw = ref.partition(":")
        type_ = type_.strip().lower()
        if not sep or not type_:
            return None
        value = self.normalize(type_, raw)
        return None if value is None else Identifier(type_, value)


@functools.lru_cache(maxsize=16_384)
def _e164(value: str, region: str | None) -> str:
    """A phone number in E.164, or as given when it is not one. Cached (a few MiB at
    most): parsing costs ~12 µs, and the same people's numbers come back with every
    identify of theirs and every CRM contact update (~1 µs of the contact's ~15 without)."""
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return value
    if not phonenumbers.is_possible_number(number):
        return value
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
