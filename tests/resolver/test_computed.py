from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.resolver.computed import fold_event

_stamps = st.lists(
    st.integers(1, 28).map(lambda d: f"2024-02-{d:02d}T00:00:00.000000Z"), max_size=10
)


@given(_stamps, st.randoms())
def test_fold_is_order_independent(stamps: list[str], rnd: Any) -> None:
    def run(order: list[str]) -> dict[str, Any]:
        computed: dict[str, Any] = {}
        for ts in order:
            fold_event(computed, {"type": "track"}, ts)
        return computed

    shuffled = list(stamps)
    rnd.shuffle(shuffled)
    result = run(stamps)
    assert result == run(shuffled)
    if stamps:
        assert result == {
            "event_count": len(stamps),
            "first_seen": min(stamps),
            "last_seen": max(stamps),
        }
