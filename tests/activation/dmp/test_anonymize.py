"""k-anonymity (:mod:`cdp_stream.activation.dmp.anonymize`): pure, and property-based."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.activation.dmp import anonymize as anonymize_module
from cdp_stream.activation.dmp.anonymize import Tally, anonymize
from cdp_stream.activation.dmp.countries import COUNTRIES
from cdp_stream.activation.dmp.facts import Facts

K = 5


def tally(overall: int, **dimensions: dict[str, int]) -> Tally:
    return Tally(overall, {name: Counter(b) for name, b in dimensions.items()})


def test_anonymize_suppresses_under_k_and_the_complement() -> None:
    shown = anonymize(
        tally(
            22,
            country={"DE": 12, "FR": 7, "IT": 3},  # IT alone would be overall - DE - FR
            device_type={"mobile": 10, "desktop": 9, "tablet": 2, "unknown": 1},
            first_touch_channel={"paid": 8, "organic": 6, "direct": 8},
        ),
        K,
    )
    assert shown == {
        ("overall", "all"): 22,
        ("country", "DE"): 12,
        ("device_type", "mobile"): 10,
        ("first_touch_channel", "paid"): 8,
        ("first_touch_channel", "organic"): 6,
        ("first_touch_channel", "direct"): 8,
    }


def test_anonymize_residual_of_several_small_buckets_is_at_least_k() -> None:
    # Two suppressed buckets summing to k or more already hide each other.
    assert anonymize(tally(20, country={"DE": 10, "FR": 4, "IT": 4, "ES": 2}), K) == {
        ("overall", "all"): 20,
        ("country", "DE"): 10,
    }
    # An audience under k publishes nothing at all.
    assert anonymize(tally(4, country={"DE": 4}), K) == {}
    # Ties in the extra suppression break by name, so runs agree.
    assert anonymize(tally(21, country={"DE": 9, "FR": 9, "IT": 2, "ES": 1}), K) == {
        ("overall", "all"): 21,
        ("country", "FR"): 9,
    }


@given(
    st.dictionaries(
        st.sampled_from(["country", "device_type", "first_touch_channel"]),
        st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6),
        min_size=1,
    ),
    st.integers(min_value=1, max_value=15),
)
def test_anonymize_never_discloses_a_group_under_k(sizes: dict[str, list[int]], k: int) -> None:
    """Whatever the partition: every published count is >= k, and so is every count an
    attacker can derive as overall minus a dimension's published buckets (or it is 0)."""
    overall = sum(next(iter(sizes.values())))
    dims = {name: {f"b{i}": n for i, n in enumerate(ns)} for name, ns in sizes.items()}
    for name, buckets in dims.items():  # every dimension partitions the same members
        buckets["rest"] = overall - sum(buckets.values()) + buckets.get("rest", 0)
        if buckets["rest"] <= 0:
            dims[name] = {"only": overall}
    shown = anonymize(tally(overall, **dims), k)
    assert all(n >= k for n in shown.values())
    if overall < k:
        assert shown == {}
        return
    for name, buckets in dims.items():
        published = {b: n for (d, b), n in shown.items() if d == name}
        residual = overall - sum(published.values())
        assert residual == 0 or residual >= k
        assert all(published[b] == buckets[b] for b in published)
        if all(n >= k for n in buckets.values()):
            assert published == buckets  # nothing hidden without a reason


def test_a_label_outside_the_vocabulary_is_a_bug_not_a_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    leaky = dict(
        anonymize_module.DIMENSIONS, country=(lambda f: str(f.traits["country"]), COUNTRIES)
    )
    monkeypatch.setattr(anonymize_module, "DIMENSIONS", leaky)
    with pytest.raises(AssertionError, match="vocabulary"):
        Tally().add(Facts(traits={"country": "Springfield"}), ["country"])
