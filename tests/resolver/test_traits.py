from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.resolver.traits import merge_traits


def test_newer_value_wins_and_older_never_overwrites() -> None:
    traits: dict[str, Any] = {}
    ts: dict[str, str] = {}
    assert merge_traits(traits, ts, {"plan": "pro"}, "2024-01-02T00:00:00.000000Z") == {
        "plan": "pro"
    }
    assert merge_traits(traits, ts, {"plan": "free"}, "2024-01-01T00:00:00.000000Z") == {}
    assert traits == {"plan": "pro"}
    assert ts == {"plan": "2024-01-02T00:00:00.000000Z"}


def test_same_value_newer_timestamp_moves_the_stamp_but_reports_no_change() -> None:
    traits: dict[str, Any] = {"plan": "pro"}
    ts = {"plan": "2024-01-01T00:00:00.000000Z"}
    assert merge_traits(traits, ts, {"plan": "pro"}, "2024-01-03T00:00:00.000000Z") == {}
    assert ts["plan"] == "2024-01-03T00:00:00.000000Z"


_updates = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from("abc"), st.one_of(st.integers(0, 3), st.text(max_size=2))),
        st.integers(0, 5).map(lambda d: f"2024-01-0{d + 1}T00:00:00.000000Z"),
    ),
    max_size=12,
)


@given(_updates, st.randoms())
def test_any_arrival_order_gives_the_same_traits(updates: list[Any], rnd: Any) -> None:
    def run(order: list[Any]) -> tuple[dict[str, Any], dict[str, str]]:
        traits: dict[str, Any] = {}
        ts: dict[str, str] = {}
        for incoming, stamp in order:
            merge_traits(traits, ts, incoming, stamp)
        return traits, ts

    shuffled = list(updates)
    rnd.shuffle(shuffled)
    assert run(updates) == run(shuffled)
