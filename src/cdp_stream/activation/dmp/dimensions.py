"""The DMP feed's dimensions and windows: which extractor fills each dimension's buckets
(and its fixed vocabulary), and the settings check that names an unknown one. Pure."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from cdp_stream.activation.dmp.channels import CHANNELS, first_touch_channel
from cdp_stream.activation.dmp.countries import COUNTRIES, country
from cdp_stream.activation.dmp.devices import DEVICE_TYPES, device_type
from cdp_stream.activation.dmp.facts import UNKNOWN, Facts
from cdp_stream.settings import Settings

Window = Literal["hour", "day"]
WINDOWS: tuple[Window, ...] = ("hour", "day")

Extractor = Callable[[Facts], str]
# Name (as in CDP_DMP_DIMENSIONS) -> (extractor, its vocabulary).
DIMENSIONS: dict[str, tuple[Extractor, frozenset[str]]] = {
    "country": (country, COUNTRIES | {UNKNOWN}),
    "device_type": (device_type, DEVICE_TYPES),
    "first_touch_channel": (first_touch_channel, CHANNELS),
}


def check_settings(settings: Settings) -> None:
    """Fail early, and by name, on a dimension or window this module does not know."""
    unknown = [d for d in settings.dmp_dimensions if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"CDP_DMP_DIMENSIONS: unknown {unknown}; known: {sorted(DIMENSIONS)}")
    bad = [w for w in settings.dmp_windows if w not in WINDOWS]
    if bad:
        raise ValueError(f"CDP_DMP_WINDOWS: unknown {bad}; known: {list(WINDOWS)}")


def window_start(now: datetime, window: str) -> datetime:
    """The UTC start of the hour or day ``now`` falls in."""
    at = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if window == "day" else at
