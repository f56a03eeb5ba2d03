"""The device-type dimension: mobile, tablet, desktop or unknown, from the latest event's
``context.device`` or else its user agent (sniffed by a few well-known words). Pure."""

from __future__ import annotations

from cdp_stream.activation.dmp.facts import UNKNOWN, Facts
from cdp_stream.activation.dmp.facts import norm as _norm
from cdp_stream.payload import as_mapping

DEVICE_TYPES = frozenset(("mobile", "tablet", "desktop", UNKNOWN))
_DEVICE_KINDS = {
    **dict.fromkeys(("tablet", "ipad"), "tablet"),
    **dict.fromkeys(("mobile", "phone", "smartphone", "ios", "iphone", "android"), "mobile"),
    **dict.fromkeys(
        ("desktop", "pc", "laptop", "computer", "mac", "macos", "windows", "linux"), "desktop"
    ),
}


def _from_user_agent(agent: str) -> str:
    ua = agent.lower()
    if any(word in ua for word in ("bot", "crawler", "spider", "headless")):
        return UNKNOWN
    if "ipad" in ua or "tablet" in ua or ("android" in ua and "mobile" not in ua):
        return "tablet"
    if any(word in ua for word in ("mobi", "iphone", "ipod", "android", "windows phone")):
        return "mobile"
    if any(word in ua for word in ("windows nt", "macintosh", "mac os x", "x11", "linux", "cros")):
        return "desktop"
    return UNKNOWN


def device_type(facts: Facts) -> str:
    """``mobile``, ``tablet``, ``desktop`` or ``unknown``, from the latest event carrying
    ``context.device.type`` (``ios``/``android`` are mobile unless ``device.model`` says
    iPad) or else its ``context.userAgent`` (bots are ``unknown``; an iPad asking for the
    desktop site counts as a desktop)."""
    device = as_mapping(facts.context.get("device"))
    kind = device.get("type")
    if isinstance(kind, str) and _norm(kind) in _DEVICE_KINDS:
        found = _DEVICE_KINDS[_norm(kind)]
        model = device.get("model")
        if found == "mobile" and isinstance(model, str) and "ipad" in model.lower():
            return "tablet"
        return found
    agent = facts.context.get("userAgent")
    return _from_user_agent(agent) if isinstance(agent, str) else UNKNOWN
