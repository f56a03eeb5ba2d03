"""The first-touch channel dimension: the taxonomy (paid, organic, referral, email, direct,
other) a first touch's utm medium, referrer or utm source falls in. Pure."""

from __future__ import annotations

from urllib.parse import urlsplit

from cdp_stream.activation.dmp.facts import Facts
from cdp_stream.activation.dmp.facts import norm as _norm
from cdp_stream.payload import as_mapping

CHANNELS = frozenset(("paid", "organic", "referral", "email", "direct", "other"))
_PAID = frozenset(
    {"cpc", "ppc", "cpm", "cpv", "cpa", "sem", "ad", "ads", "display", "banner", "retargeting"}
    | {"remarketing", "affiliate", "affiliates", "paidsearch", "paidsocial"}
)
_EMAIL = frozenset(("email", "mail", "newsletter", "emailmarketing"))
_ORGANIC = frozenset(("organic", "seo", "social", "socialmedia", "organicsocial", "sm"))
_REFERRAL = frozenset(("referral", "referrer", "link", "partner"))
_DIRECT = frozenset(("direct", "none", ""))
_SEARCH_ENGINES = ("google", "bing", "duckduckgo", "yahoo", "baidu", "yandex", "ecosia")
_MAIL_HOSTS = ("mail.google.", "outlook.", "mail.yahoo.", "mail.", "webmail.")


def _channel_of_medium(medium: str) -> str:
    name = _norm(medium)
    if name.startswith("paid") or name in _PAID:
        return "paid"
    for names, channel in ((_EMAIL, "email"), (_ORGANIC, "organic"), (_REFERRAL, "referral")):
        if name in names:
            return channel
    return "direct" if name in _DIRECT else "other"


def _channel_of_referrer(referrer: str) -> str:
    try:
        host = (urlsplit(referrer.strip()).hostname or "").lower()
    except ValueError:
        return "other"
    if not host:
        return "other"
    if host.startswith(_MAIL_HOSTS):
        return "email"
    labels = host.split(".")
    if any(engine in labels for engine in _SEARCH_ENGINES):
        return "organic"
    return "referral"


def first_touch_channel(facts: Facts) -> str:
    """``paid``, ``organic``, ``referral``, ``email``, ``direct`` or ``other``, from
    ``computed.first_touch`` (the earliest event with utm parameters or a referrer):
    its utm medium when set (``cpc``/``paid*``/``display``/... paid, ``email`` email,
    ``organic``/``social`` organic, ``referral`` referral, ``none`` direct, anything else
    other); else its referrer's host (a webmail host email, a search engine organic, any
    other site referral); else its utm source (``email``/``newsletter`` email, a search
    engine organic, else other). No first touch at all: ``direct``."""
    touch = as_mapping(facts.computed.get("first_touch"))
    medium, referrer, source = touch.get("medium"), touch.get("referrer"), touch.get("source")
    if isinstance(medium, str) and medium.strip():
        return _channel_of_medium(medium)
    if isinstance(referrer, str) and referrer.strip():
        return _channel_of_referrer(referrer)
    if isinstance(source, str) and source.strip():
        name = _norm(source)
        if name in _EMAIL:
            return "email"
        return "organic" if name in _SEARCH_ENGINES else "other"
    return "direct"
