"""What a profile is reduced to for the DMP feed (:class:`Facts`), and the spelling rule
the extractors compare names by. The extractors (``consent.py``, ``countries.py``,
``devices.py``, ``channels.py``) see these and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = "unknown"  # the bucket of a profile an extractor cannot place


@dataclass(frozen=True, slots=True)
class Facts:
    """The only parts of a profile the DMP feed reads: the extractors and the consent rule
    see these and nothing else, so nothing else can leak into a bucket.

    ``traits``: ``consent``, ``address``, ``country`` of the profile's traits;
    ``computed``: ``first_touch``; ``context``: ``consent`` of the latest event carrying
    ``context.consent``, ``location`` of the latest carrying ``context.location.country``,
    ``device`` and ``userAgent`` of the latest carrying ``context.device.type`` or
    ``context.userAgent``.
    """

    traits: Mapping[str, Any] = field(default_factory=dict)
    computed: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)


def norm(value: str) -> str:
    """Lower case, letters and digits only: ``"Ad Storage"``, ``ad_storage`` -> ``adstorage``."""
    return re.sub(r"[^a-z0-9]", "", value.lower())
