"""The device-type dimension (:mod:`cdp_stream.activation.dmp.devices`): pure."""

from __future__ import annotations

from typing import Any

import pytest

from cdp_stream.activation.dmp.devices import device_type
from cdp_stream.activation.dmp.facts import Facts

IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile"
IPAD = "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 Safari/604.1"
ANDROID_TABLET = "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 Safari/537.36"
ANDROID_PHONE = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Mobile Safari"
WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.mark.parametrize(
    ("context", "bucket"),
    [
        ({"device": {"type": "ios", "model": "iPhone15,2"}}, "mobile"),
        ({"device": {"type": "ios", "model": "iPad13,1"}}, "tablet"),
        ({"device": {"type": "Android"}}, "mobile"),
        ({"device": {"type": "tablet"}}, "tablet"),
        ({"device": {"type": "Desktop"}}, "desktop"),
        ({"device": {"type": "fridge"}, "userAgent": WINDOWS}, "desktop"),
        ({"userAgent": IPHONE}, "mobile"),
        ({"userAgent": ANDROID_PHONE}, "mobile"),
        ({"userAgent": IPAD}, "tablet"),
        ({"userAgent": ANDROID_TABLET}, "tablet"),
        ({"userAgent": WINDOWS}, "desktop"),
        ({"userAgent": GOOGLEBOT}, "unknown"),
        ({"userAgent": "curl/8.0"}, "unknown"),
        ({"device": "phone", "userAgent": 7}, "unknown"),
        ({}, "unknown"),
    ],
)
def test_device_type(context: dict[str, Any], bucket: str) -> None:
    assert device_type(Facts(context=context)) == bucket
