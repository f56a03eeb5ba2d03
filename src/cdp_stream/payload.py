"""Reading events, which are client data: any field may hold any JSON value.

Shared by every stage that looks inside an event (identity, traits, the CRM feed, DMP
dimensions), so each reads a field the same way instead of trusting its type.
"""

from collections.abc import Mapping
from typing import Any


def as_mapping(value: object) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one: events are client data. (A
    plain dict, what JSON decodes to, is tested first: the ABC check costs ~1 us.)"""
    return value if type(value) is dict or isinstance(value, Mapping) else {}
