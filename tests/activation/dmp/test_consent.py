"""Consent (:mod:`cdp_stream.activation.dmp.consent`): pure."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_stream.activation.dmp.consent import opted_out
from cdp_stream.activation.dmp.facts import Facts


@pytest.mark.parametrize(
    ("consent", "out"),
    [
        (None, False),
        ({}, False),
        ({"analytics": False}, False),  # says nothing about marketing or ads
        ({"marketing": True, "advertising": "granted"}, False),
        ({"marketing": False}, True),
        ({"Advertising": "denied"}, True),
        ({"ad_storage": "denied", "analytics_storage": "granted"}, True),
        ({"ad_storage": "granted", "ad_user_data": "granted"}, False),
        ({"marketingAndAnalytics": "no"}, True),
        ({"targeting": {"status": "granted"}}, False),
        ({"targeting": {"status": "pending"}}, True),
        ({"targeting": {"note": "asked twice"}}, True),
        ({"advertising": None}, True),  # not a clear yes
        ({"categoryPreferences": {"Advertising": False, "Functional": True}}, True),
        ({"categoryPreferences": {"Advertising": True, "Marketing": True}}, False),
        ({"categories": {"advertising": False}}, True),
        ({"categories": ["necessary", "marketing", "advertising"]}, False),
        ({"categories": ["necessary", "analytics"]}, True),
        (["marketing", "advertising"], False),
        (["Marketing", "Targeting Cookies"], False),
        (["marketing", "analytics"], True),  # no advertising granted
        (["advertising"], True),  # no marketing granted
        ([], True),
        (True, False),
        ("granted", False),
        (False, True),
        ("denied", True),
        ("maybe", True),
        (1, True),
    ],
)
def test_consent_shapes(consent: Any, out: bool) -> None:
    assert opted_out(Facts(traits={"consent": consent})) is out
    assert opted_out(Facts(context={"consent": consent})) is out


def test_either_statement_refusing_is_enough() -> None:
    yes, no = {"marketing": True, "advertising": True}, {"marketing": False}
    assert not opted_out(Facts(traits={"consent": yes}, context={"consent": yes}))
    assert opted_out(Facts(traits={"consent": yes}, context={"consent": no}))
    assert opted_out(Facts(traits={"consent": no}, context={"consent": yes}))
