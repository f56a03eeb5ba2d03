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
    def dmp_audience_counts(self) -> str:
        return f"{self.namespace}cdp.dmp.audience-counts"

    @property
    def dead_letters(self) -> str:
        """Records a consumer can never apply, each with its reason (cdp_stream.poison)."""
        return f"{self.namespace}cdp.dead-letters"

    @property
    def resolver_group(self) -> str:
        return f"{self.namespace}cdp-resolver"

    @property
    def activation_group(self) -> str:
        return f"{self.namespace}cdp-activation"

    def all(self, partitions: int) -> dict[str, int]:
        """Topic -> partition count that the application creates at start-up if missing."""
        names = (
            self.events,
            self.rejected,
            self.profile_updates,
            self.dmp_audience_counts,
            self.dead_letters,
        )
        return dict.fromkeys(names, partitions)
