"""The first-touch channel dimension (:mod:`cdp_stream.activation.dmp.channels`): pure."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_stream.activation.dmp.channels import first_touch_channel
from cdp_stream.activation.dmp.facts import Facts


@pytest.mark.parametrize(
    ("touch", "bucket"),
    [
        ({"medium": "cpc", "source": "google"}, "paid"),
        ({"medium": "Paid_Social", "source": "facebook"}, "paid"),
        ({"medium": "display"}, "paid"),
        ({"medium": "email", "source": "newsletter"}, "email"),
        ({"medium": "organic", "source": "google"}, "organic"),
        ({"medium": "social"}, "organic"),
        ({"medium": "referral", "referrer": "https://blog.example/post"}, "referral"),
        ({"medium": "(none)"}, "direct"),
        ({"medium": "print"}, "other"),
        ({"referrer": "https://www.google.com/search?q=x"}, "organic"),
        ({"referrer": "https://duckduckgo.com/"}, "organic"),
        ({"referrer": "https://mail.google.com/mail/u/0/"}, "email"),
        ({"referrer": "https://news.ycombinator.com/item?id=1"}, "referral"),
        ({"referrer": "not a url"}, "other"),
        ({"referrer": "http://[::1"}, "other"),  # urlsplit refuses it
        ({"source": "Newsletter"}, "email"),
        ({"source": "bing"}, "organic"),
        ({"source": "partner-x", "campaign": "spring"}, "other"),
        ({"campaign": "spring"}, "direct"),
        (None, "direct"),
    ],
)
def test_first_touch_channel(touch: dict[str, Any] | None, bucket: str) -> None:
    computed = {} if touch is None else {"first_touch": {"at": "2024-01-01", **touch}}
    assert first_touch_channel(Facts(computed=computed)) == bucket
