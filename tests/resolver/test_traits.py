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


def test_changed_lists_only_shown_values_that_differ() -> None:
    before = fold([(identify(plan="pro", city="Oslo"), DAY1)])
    after = traits.merge(before, {})
    for part in (identify(plan="pro", city="Rome", age=3), identify(plan="free")):
        traits.fold(after, traits.of_event(part, DAY2 if "city" in part["traits"] else DAY1))
    assert traits.changed(before, after) == {"age": 3, "city": "Rome"}
    assert list(traits.changed(before, after)) == ["age", "city"]
    assert traits.changed(after, traits.merge(after, {})) == {}


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


@given(_events, _events, st.randoms())
def test_changed_is_the_difference_of_the_views(
    events: list[Any], more: list[Any], rnd: Any
) -> None:
    before = fold(events)
    after = traits.merge(before, {})
    for part in more:
        traits.fold(after, traits.of_event(*part))
    if rnd.random() < 0.5:  # a merge: another profile's entries, not objects of before's
        after = traits.merge(after, fold(events[: rnd.randint(0, len(events))]))
    shown, now = traits.view(before), traits.view(after)
    expected = {k: v for k, v in now.items() if k not in shown or shown[k] != v}
    assert traits.changed(before, after) == expected
    assert list(traits.changed(before, after)) == sorted(expected)
