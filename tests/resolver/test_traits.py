"""Trait state: newest wins, set-once keeps the oldest, any order gives the same result."""

from __future__ import annotations

from functools import reduce
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.resolver import traits

DAY1, DAY2, DAY3 = (f"2024-01-0{d}T00:00:00.000000Z" for d in (1, 2, 3))


def fold(events: list[tuple[dict[str, Any], str]]) -> traits.TraitState:
    empty: traits.TraitState = {"set": {}, "once": {}}
    return reduce(traits.merge, (traits.of_event(e, ts) for e, ts in events), empty)


def identify(**values: Any) -> dict[str, Any]:
    return {"type": "identify", "traits": values}


def test_newer_value_wins_and_older_never_overwrites() -> None:
    state = fold([(identify(plan="pro"), DAY2), (identify(plan="free"), DAY1)])
    assert traits.view(state) == {"plan": "pro"}
    assert state["set"]["plan"] == [DAY2, "pro"]


def test_identify_traits_win_over_context_traits_and_track_traits_are_ignored() -> None:
    event = {"type": "identify", "traits": {"plan": "pro"}, "context": {"traits": {"plan": "x"}}}
    track = {
        "type": "track",
        "traits": {"plan": "ignored"},
        "context": {"traits": {"city": "Oslo"}},
    }
    assert traits.view(fold([(event, DAY1), (track, DAY1)])) == {"plan": "pro", "city": "Oslo"}


def test_set_once_keeps_the_oldest_and_a_regular_set_overrides_it() -> None:
    once = [
        ({"type": "track", "context": {"traits_set_once": {"src": v}}}, ts)
        for v, ts in (("ads", DAY2), ("seo", DAY1), ("mail", DAY3))
    ]
    assert traits.view(fold(once)) == {"src": "seo"}
    assert traits.view(fold([*once, (identify(src="manual"), DAY1)])) == {"src": "manual"}


def test_changes_lists_only_values_that_differ() -> None:
    before = {"plan": "pro", "city": "Oslo"}
    assert traits.changes(before, {"plan": "pro", "city": "Rome", "age": 3}) == {
        "city": "Rome",
        "age": 3,
    }


_events = st.lists(
    st.tuples(
        st.fixed_dictionaries(
            {"type": st.just("identify")},
            optional={
                "traits": st.dictionaries(
                    st.sampled_from("abc"), st.one_of(st.integers(0, 3), st.text(max_size=2))
                ),
                "context": st.fixed_dictionaries(
                    {},
                    optional={
                        "traits_set_once": st.dictionaries(
                            st.sampled_from("bcd"), st.integers(0, 3)
                        )
                    },
                ),
            },
        ),
        st.sampled_from([DAY1, DAY2, DAY3]),
    ),
    max_size=12,
)


@given(_events, st.randoms())
def test_any_arrival_order_and_grouping_gives_the_same_traits(events: list[Any], rnd: Any) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(events))
    two_profiles = traits.merge(fold(shuffled[:cut]), fold(shuffled[cut:]))
    assert fold(events) == fold(shuffled) == two_profiles
