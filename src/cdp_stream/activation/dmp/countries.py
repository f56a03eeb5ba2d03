"""The country dimension: an ISO 3166-1 alpha-2 code from a profile's address, traits or
latest event location, else ``unknown``. Pure."""

from __future__ import annotations

from cdp_stream.activation.dmp.facts import UNKNOWN, Facts
from cdp_stream.payload import as_mapping

_ISO_3166_ALPHA_2 = """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM
    DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS
    GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN
    KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ
    MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM
    PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI
    VN VU WF WS YE YT ZA ZM ZW"""
COUNTRIES = frozenset(_ISO_3166_ALPHA_2.split())


def _country_code(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    code = value.strip().upper()
    code = "GB" if code == "UK" else code
    return code if code in COUNTRIES else None


def country(facts: Facts) -> str:
    """An ISO 3166-1 alpha-2 code (``DE``; ``uk`` -> ``GB``) or ``unknown``: the first valid
    of ``traits.address.country``, ``traits.country``, then ``context.location.country``
    of the latest event carrying one. Names ("Germany") and other codes are ``unknown``."""
    candidates = (
        as_mapping(facts.traits.get("address")).get("country"),
        facts.traits.get("country"),
        as_mapping(facts.context.get("location")).get("country"),
    )
    for value in candidates:
        code = _country_code(value)
        if code is not None:
            return code
    return UNKNOWN
