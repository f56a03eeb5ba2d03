"""The resolver: events from ``cdp.events`` become unified profiles in Postgres.

The rules, which ``tests/resolver/oracle.py`` re-implements independently (a sequential
union-find) and the oracle tests hold the real resolver to:

Identifiers (``identity.py``), in this default priority order: ``user_id`` (userId),
``email`` (``traits.email`` of any event, ``context.traits.email``; trimmed, lower-cased),
``phone`` (``traits.phone``, ``context.traits.phone``; E.164 when it parses, else trimmed),
then ``anonymous_id`` (anonymousId), ``device_id`` (``context.device.id``),
``advertising_id`` (``context.device.advertisingId``) and custom ids from
``context.externalIds`` (``[{"id", "type"}]``, type lower-cased; a type naming a built-in
one is normalized as that one), custom types in alphabetical order. Values are trimmed;
blocked values (``CDP_IDENTITY_BLOCKED_VALUES``, compared case-insensitively, plus any
value matching ``^[0-]*$``) never link anything. An event with no usable identifier is
parked on the rejected topic with that reason.

One event, in order (``batch.py``): walk its identifiers in priority order, building the
event's group: the first identifier's profile (or a new one). Each further identifier
owned by another profile merges that profile in, unless the union would hold more values
of one type than its limit (``CDP_IDENTITY_LIMITS``, default ``user_id`` 1, others 5),
or an operator split the two groups (an unmerge records a split between the two profiles
it makes; it binds their groups whatever they merge with later, until it is removed):
then that merge is refused and recorded. An unowned identifier is claimed by the group
unless that breaks its type's limit (refused and recorded likewise). The canonical profile
of a merge is the oldest (created first, then lowest id); merged-away profiles keep their
rows (``merged_into``), every identity and event moves to the canonical one, and the merge
log records which profiles, which event and when. The event belongs to the canonical
profile of its group.

Profile state, the same whatever order events arrive in (``traits.py``, ``computed.py``):
``traits`` come from ``context.traits`` and, for ``identify``, ``traits`` (which win over
``context.traits``); each trait keeps the timestamp of the event that set it and the newest
wins (equal timestamps: the larger JSON text). ``context.traits_set_once`` sets a trait
only once: the oldest wins (equal: the smaller JSON), and a regular value overrides it.
``computed`` is a commutative fold of the events; merging two profiles merges their
computed values the same way (see ``computed.py`` for each field).
"""

from collections.abc import Mapping
from typing import Any


def as_mapping(value: object) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one: events are client data. (A
    plain dict, what JSON decodes to, is tested first: the ABC check costs ~1 us.)"""
    return value if type(value) is dict or isinstance(value, Mapping) else {}
