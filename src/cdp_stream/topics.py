"""Topic names and partition keys: the only place they are spelled."""

from __future__ import annotations

EVENTS = "cdp.events"
REJECTED = "cdp.events.rejected"
PROFILE_UPDATES = "cdp.profile-updates"
DMP_AUDIENCE_COUNTS = "cdp.dmp.audience-counts"

RESOLVER_GROUP = "cdp-resolver"
ACTIVATION_GROUP = "cdp-activation"


def all_topics(partitions: int) -> dict[str, int]:
    """Topic -> partition count that the application creates at start-up if missing."""
    return {EVENTS: partitions, REJECTED: partitions, PROFILE_UPDATES: partitions}
