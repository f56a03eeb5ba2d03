"""Topic and consumer-group names: the only place they are spelled.

``CDP_TOPIC_NAMESPACE`` (default empty) prefixes every name, so several deployments, a
benchmark or a test run can share one Kafka cluster without reading each other's records.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    """The names for one namespace."""

    namespace: str = ""

    @property
    def events(self) -> str:
        return f"{self.namespace}cdp.events"

    @property
    def rejected(self) -> str:
        return f"{self.namespace}cdp.events.rejected"

    @property
    def profile_updates(self) -> str:
        return f"{self.namespace}cdp.profile-updates"

    @property
    def resolver_group(self) -> str:
        return f"{self.namespace}cdp-resolver"

    def all(self, partitions: int) -> dict[str, int]:
        """Topic -> partition count that the application creates at start-up if missing."""
        return {
            self.events: partitions,
            self.rejected: partitions,
            self.profile_updates: partitions,
        }
