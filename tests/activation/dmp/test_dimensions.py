"""The dimensions and windows (:mod:`cdp_stream.activation.dmp.dimensions`): pure."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cdp_stream.activation.dmp.dimensions import DIMENSIONS, check_settings, window_start
from cdp_stream.activation.dmp.facts import Facts
from cdp_stream.settings import Settings

NOW = datetime(2024, 6, 1, 12, 34, 56, tzinfo=UTC)


def test_every_extractor_answers_from_its_vocabulary_for_any_json() -> None:
    """Garbage in, a vocabulary label out: no raw value can pass through."""
    junk: list[Any] = [None, 1, 1.5, True, "x", [], ["DE"], {"a": {"b": None}}, "Mobile Safari"]
    for value in junk:
        facts = Facts(
            traits={"address": value, "country": value, "consent": value},
            computed={"first_touch": value},
            context={"location": value, "device": value, "userAgent": value},
        )
        for name, (extract, vocabulary) in DIMENSIONS.items():
            assert extract(facts) in vocabulary, (name, value)


def test_windows_and_settings() -> None:
    assert window_start(NOW, "hour") == datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert window_start(NOW, "day") == datetime(2024, 6, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"CDP_DMP_DIMENSIONS.*zodiac"):
        check_settings(Settings(dmp_dimensions=["country", "zodiac"]))
    with pytest.raises(ValueError, match=r"CDP_DMP_WINDOWS.*week"):
        check_settings(Settings(dmp_windows=["week"]))
