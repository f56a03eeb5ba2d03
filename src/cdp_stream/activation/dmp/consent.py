"""Consent: whether a profile refused marketing or advertising (then the DMP feed does not
count it), from the shapes consent tools write. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from cdp_stream.activation.dmp.facts import Facts
from cdp_stream.activation.dmp.facts import norm as _norm

_YES = frozenset(
    {"true", "yes", "y", "granted", "grant", "given", "accepted", "accept", "allow", "allowed"}
    | {"optin", "optedin", "consented", "on"}
)
_NESTED = ("categorypreferences", "categories", "preferences", "purposes")
_AD_CATEGORIES = frozenset(
    {"ads", "adstorage", "aduserdata", "adpersonalization", "adtargeting", "targeting"}
    | {"targetingcookies", "personalizedads", "personalisedads"}
)


def _is_marketing(category: str) -> bool:
    return "marketing" in _norm(category)


def _is_advertising(category: str) -> bool:
    name = _norm(category)
    return "advertising" in name or name in _AD_CATEGORIES


def _granted(value: object) -> bool:
    """A clear yes: ``True``, a yes-word, or ``{"granted"|"status"|...: <a yes>}``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _norm(value) in _YES
    if isinstance(value, Mapping):
        for key in ("granted", "consented", "status", "value"):
            if key in value:
                return _granted(value[key])
    return False


def _says_no(consent: object) -> bool:
    """Whether one consent statement refuses marketing or advertising (see opted_out)."""
    if consent is None:
        return False
    if isinstance(consent, list):
        granted = [c for c in consent if isinstance(c, str)]
        return not (any(map(_is_marketing, granted)) and any(map(_is_advertising, granted)))
    if isinstance(consent, Mapping):
        for key, value in consent.items():
            if _norm(key) in _NESTED:
                if _says_no(value):
                    return True
            elif (_is_marketing(key) or _is_advertising(key)) and not _granted(value):
                return True
        return False
    return not _granted(consent)


def opted_out(facts: Facts) -> bool:
    """Whether the profile refused marketing or advertising: then it is not counted.

    Two statements are read, the ``consent`` trait and ``context.consent`` of the latest
    event carrying one; either refusing is enough. Accepted shapes (category names compare
    case- and punctuation-insensitively; a *marketing* category is one whose name contains
    "marketing", an *advertising* one contains "advertising" or is ``ads``, ``targeting``,
    ``ad_storage``, ``ad_user_data``, ``ad_personalization``, ``ad_targeting``, ...):

    * a mapping of categories to choices: ``{"marketing": false}``,
      ``{"Advertising": "denied"}`` (Google Consent Mode: ``{"ad_storage": "denied"}``);
      any marketing or advertising category whose value is not a clear yes (``true``,
      ``"granted"``, ``"yes"``, ``{"status": "granted"}``, ...) is a refusal; categories
      it does not name are not;
    * the same mapping nested under ``categoryPreferences`` (Segment), ``categories``,
      ``preferences`` or ``purposes``;
    * a list of granted categories (also nested as above): it must name a marketing *and*
      an advertising category, what it leaves out is refused;
    * a scalar for everything: ``false`` or ``"denied"`` refuses, ``true`` or
      ``"granted"`` does not; an unrecognized value refuses (when in doubt, leave it out).

    No statement at all is no refusal: the feed counts unless told not to.
    """
    return _says_no(facts.traits.get("consent")) or _says_no(facts.context.get("consent"))
