"""The country dimension (:mod:`cdp_stream.activation.dmp.countries`): pure."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_stream.activation.dmp.countries import country
from cdp_stream.activation.dmp.facts import Facts


@pytest.mark.parametrize(
    ("traits", "context", "bucket"),
    [
        ({"address": {"country": "de", "city": "Berlin"}}, {}, "DE"),
        ({"country": " fr "}, {}, "FR"),
        ({"country": "uk"}, {}, "GB"),
        ({}, {"location": {"country": "IT"}}, "IT"),
        ({"address": {"country": "Germany"}, "country": "ES"}, {}, "ES"),  # first valid wins
        ({"country": "Neverland"}, {"location": {"country": "PT"}}, "PT"),
        ({"country": "Germany"}, {"location": {"country": "United States"}}, "unknown"),
        ({"country": "ZZ"}, {}, "unknown"),  # two letters, not an assigned code
        ({"address": "Main St 1", "country": 49}, {"location": "x"}, "unknown"),
        ({}, {}, "unknown"),
    ],
)
def test_country(traits: dict[str, Any], context: dict[str, Any], bucket: str) -> None:
    assert country(Facts(traits=traits, context=context)) == bucket
