"""The DMP feed: per audience, anonymized member counts per time window and coarse bucket.

Counts and nothing else leave the CDP here: buckets under k are suppressed, so is one whose
value a residual would reveal, and counts may carry keyed Laplace noise. The message shape,
who is counted and the anonymization steps in order are specified in docs/dmp.md (what
"the module docstring" below refers to).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from sqlalchemy import Select, delete, func, or_, select, text, true
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream import metrics
from cdp_stream.bus.base import Bus, BusUnavailable, Record
from cdp_stream.payload import as_mapping
from cdp_stream.profiles.db import retrying, stopped_within
from cdp_stream.profiles.models import (
    audience_members,
    audiences,
    dmp_audience_counts,
    events,
    profiles,
)
from cdp_stream.profiles.repository import lock_key
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)

OVERALL, ALL, UNKNOWN = "overall", "all", "unknown"
Window = Literal["hour", "day"]
WINDOWS: tuple[Window, ...] = ("hour", "day")


# --- what a profile is reduced to --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """The only parts of a profile the DMP feed reads: the extractors and the consent rule
    see these and nothing else, so nothing else can leak into a bucket.

    ``traits``: ``consent``, ``address``, ``country`` of the profile's traits;
    ``computed``: ``first_touch``; ``context``: ``consent`` of the latest event carrying
    ``context.consent``, ``location`` of the latest carrying ``context.location.country``,
    ``device`` and ``userAgent`` of the latest carrying ``context.device.type`` or
    ``context.userAgent``.
    """

    traits: Mapping[str, Any] = field(default_factory=dict)
    computed: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)


def _norm(value: str) -> str:
    """Lower case, letters and digits only: ``"Ad Storage"``, ``ad_storage`` -> ``adstorage``."""
    return re.sub(r"[^a-z0-9]", "", value.lower())


# --- consent -----------------------------------------------------------------------------

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


# --- the dimensions: a profile -> one bucket of a fixed vocabulary ------------------------

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


Extractor = Callable[[Facts], str]
# Name (as in CDP_DMP_DIMENSIONS) -> (extractor, its vocabulary).
DIMENSIONS: dict[str, tuple[Extractor, frozenset[str]]] = {
    "country": (country, COUNTRIES | {UNKNOWN}),
    "device_type": (device_type, DEVICE_TYPES),
    "first_touch_channel": (first_touch_channel, CHANNELS),
}


def check_settings(settings: Settings) -> None:
    """Fail early, and by name, on a dimension or window this module does not know."""
    unknown = [d for d in settings.dmp_dimensions if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"CDP_DMP_DIMENSIONS: unknown {unknown}; known: {sorted(DIMENSIONS)}")
    bad = [w for w in settings.dmp_windows if w not in WINDOWS]
    if bad:
        raise ValueError(f"CDP_DMP_WINDOWS: unknown {bad}; known: {list(WINDOWS)}")


# --- anonymization (pure) ----------------------------------------------------------------


@dataclass
class Tally:
    """Exact counts of one audience at one moment: what anonymization starts from."""

    overall: int = 0
    buckets: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, facts: Facts, dimensions: Iterable[str]) -> None:
        """Count one consenting profile in ``overall`` and in one bucket per dimension."""
        self.overall += 1
        for name in dimensions:
            extract, vocabulary = DIMENSIONS[name]
            bucket = extract(facts)
            if bucket not in vocabulary:  # a bug in an extractor must not become a leak
                raise AssertionError(f"{name}: {bucket!r} is not in its vocabulary")
            self.buckets.setdefault(name, Counter())[bucket] += 1


Cell = tuple[str, str]  # (dimension, bucket)


def anonymize(tally: Tally, k: int) -> dict[Cell, int]:
    """The cells that may be published, with their exact counts (steps 1 and 2 of the
    module docstring): nothing under k, and per dimension a residual (overall minus its
    published buckets) that is 0 or at least k."""
    if tally.overall < k:
        return {}
    out: dict[Cell, int] = {(OVERALL, ALL): tally.overall}
    for name, counts in tally.buckets.items():
        shown = {bucket: n for bucket, n in counts.items() if n >= k}
        residual = tally.overall - sum(shown.values())
        while 0 < residual < k and shown:
            smallest = min(shown, key=lambda b: (shown[b], b))
            residual += shown.pop(smallest)
        out.update(((name, bucket), n) for bucket, n in shown.items())
    return out


class LaplaceNoise:
    """Laplace noise of scale 1/epsilon (sensitivity 1), a deterministic function of a
    secret key, the cell and the exact count (see the module docstring for why)."""

    def __init__(self, epsilon: float, key: bytes) -> None:
        if not epsilon > 0:
            raise ValueError("epsilon must be > 0")
        self.epsilon = epsilon
        self._key = key

    def sample(self, cell: tuple[str, ...], exact: int) -> float:
        """Inverse CDF of Laplace(0, 1/epsilon) at a uniform in (0, 1) from HMAC-SHA256."""
        message = "\x1f".join((*cell, str(exact))).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        u = ((int.from_bytes(digest[:8], "big") >> 11) + 0.5) / 2**53 - 0.5  # (-0.5, 0.5)
        return -math.copysign(1 / self.epsilon, u) * math.log(1 - 2 * abs(u))

    def noisy(self, cell: tuple[str, ...], exact: int) -> int:
        """Rounded (floating-point noise's low bits leak, integers do not) and >= 0."""
        return max(0, round(exact + self.sample(cell, exact)))


# --- the run ----------------------------------------------------------------------------


def window_start(now: datetime, window: str) -> datetime:
    """The UTC start of the hour or day ``now`` falls in."""
    at = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if window == "day" else at


def _latest(alias: str, pid: Any, paths: list[tuple[str, ...]], labels: list[str]) -> Any:
    """A lateral subquery: ``context.<path>`` of the profile's latest event carrying any
    of ``paths`` (one row at most)."""
    e = events.alias(alias)
    columns = [
        e.c.payload[("context", *p)].label(lbl) for p, lbl in zip(paths, labels, strict=True)
    ]
    carrying = or_(*(e.c.payload[("context", *p)].is_not(None) for p in paths))
    return (
        select(*columns)
        .where(e.c.profile_id == pid, carrying)
        .order_by(e.c.timestamp.desc(), e.c.id.desc())
        .limit(1)
        .lateral(alias)
    )


def _facts_query(audience_id: uuid.UUID, dimensions: Iterable[str]) -> Select[Any]:
    """One row of facts per distinct canonical member of the audience."""
    member = profiles.alias("member")
    canonical = func.coalesce(member.c.merged_into, member.c.id).label("pid")
    members = (
        select(canonical)
        .select_from(audience_members.join(member, member.c.id == audience_members.c.profile_id))
        .where(audience_members.c.audience_id == audience_id)
        .distinct()
        .subquery("members")
    )
    p = profiles
    stmt = (
        select(
            p.c.traits["consent"].label("t_consent"),
            p.c.traits["address"].label("t_address"),
            p.c.traits["country"].label("t_country"),
            p.c.computed["first_touch"].label("first_touch"),
        )
        .select_from(members.join(p, p.c.id == members.c.pid))
        .where(p.c.merged_into.is_(None))
    )
    laterals: list[tuple[str, list[tuple[str, ...]], list[str]]] = [
        ("consent_ev", [("consent",)], ["c_consent"])
    ]
    if "country" in dimensions:
        laterals.append(("location_ev", [("location", "country")], ["c_country"]))
    if "device_type" in dimensions:
        laterals.append(
            ("device_ev", [("device", "type"), ("userAgent",)], ["c_device_type", "c_agent"])
        )
    for alias, paths, labels in laterals:
        lateral = _latest(alias, p.c.id, paths, labels)
        stmt = stmt.outerjoin(lateral, true()).add_columns(*(lateral.c[lbl] for lbl in labels))
    return stmt


def _facts(row: Mapping[str, Any]) -> Facts:
    device = {"type": row.get("c_device_type")}
    return Facts(
        traits={
            "consent": row["t_consent"],
            "address": row["t_address"],
            "country": row["t_country"],
        },
        computed={"first_touch": row["first_touch"]},
        context={
            "consent": row["c_consent"],
            "location": {"country": row.get("c_country")},
            "device": device,
            "userAgent": row.get("c_agent"),
        },
    )


async def tally(conn: AsyncConnection, audience_id: uuid.UUID, dimensions: list[str]) -> Tally:
    """The exact counts of the audience's consenting members, in one statement (one
    snapshot), streamed: an audience of millions is never held in memory.

    Cost: per member, up to three backward walks of its timeline (the profile/timestamp
    index) to the latest event carrying consent, a location or a device; a profile that
    never sent ``context.consent`` is walked to its first event. Should that grow heavy,
    the resolver can fold these into ``computed`` and this becomes a scan of profiles."""
    out = Tally(buckets={name: Counter() for name in dimensions})
    result = await conn.stream(_facts_query(audience_id, dimensions))
    async for row in result.mappings():
        facts = _facts(row)
        if not opted_out(facts):
            out.add(facts, dimensions)
    return out


def _message(
    topic: str,
    audience_id: uuid.UUID,
    window: str,
    start: datetime,
    cell: Cell,
    count: int | None,
    eps: float | None,
) -> Record:
    """The one message shape: see the module docstring; nothing else goes in."""
    value = {
        "audience_id": str(audience_id),
        "window": window,
        "window_start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),  # as the API writes it
        "dimension": cell[0],
        "bucket": cell[1],
        "count": count,
        "epsilon": eps,
    }
    return Record(topic, str(audience_id).encode(), orjson.dumps(value))


async def _count_audience(
    conn: AsyncConnection,
    audience_id: uuid.UUID,
    settings: Settings,
    now: datetime,
    noise: LaplaceNoise | None,
    topic: str,
) -> list[Record]:
    """Count one audience and bring its current windows' rows up to date; the records
    for what changed (new or different counts, withdrawn buckets)."""
    lock = text("SELECT pg_try_advisory_xact_lock(:key)")
    if not (await conn.execute(lock, {"key": lock_key("dmp", str(audience_id))})).scalar():
        return []  # another activation process is counting it right now
    tallied = await tally(conn, audience_id, settings.dmp_dimensions)
    exact = anonymize(tallied, settings.dmp_k)
    metrics.dmp_buckets.labels("suppressed").inc(_suppressed(tallied, exact))
    eps = noise.epsilon if noise is not None else None
    counts = {
        cell: noise.noisy((str(audience_id), *cell), n) if noise is not None else n
        for cell, n in exact.items()
    }
    t = dmp_audience_counts.c
    records: list[Record] = []
    for window in dict.fromkeys(settings.dmp_windows):
        start = window_start(now, window)
        here = (t.audience_id == audience_id, t.window == window, t.window_start == start)
        rows = await conn.execute(select(t.dimension, t.bucket, t.count, t.epsilon).where(*here))
        before = {(dimension, bucket): (n, e) for dimension, bucket, n, e in rows}
        changed = {cell: n for cell, n in counts.items() if before.get(cell) != (n, eps)}
        gone = sorted(before.keys() - counts.keys())
        if changed:
            stmt = insert(dmp_audience_counts)
            await conn.execute(
                stmt.on_conflict_do_update(
                    constraint="dmp_audience_counts_key",
                    set_={"count": stmt.excluded.count, "epsilon": stmt.excluded.epsilon},
                ),
                [
                    {
                        "audience_id": audience_id,
                        "window": window,
                        "window_start": start,
                        "dimension": dimension,
                        "bucket": bucket,
                        "count": n,
                        "epsilon": eps,
                    }
                    for (dimension, bucket), n in sorted(changed.items())
                ],
            )
        for dimension, bucket in gone:
            await conn.execute(
                delete(dmp_audience_counts).where(
                    *here, t.dimension == dimension, t.bucket == bucket
                )
            )
        records += [
            _message(topic, audience_id, window, start, c, n, eps) for c, n in changed.items()
        ]
        records += [_message(topic, audience_id, window, start, c, None, eps) for c in gone]
    return records


def _suppressed(tallied: Tally, published: Mapping[Cell, int]) -> int:
    """How many of the tally's non-empty cells (the overall one too) anonymization held
    back."""
    cells = [(OVERALL, ALL)] if tallied.overall else []
    cells += [(d, b) for d, counts in tallied.buckets.items() for b, n in counts.items() if n]
    return sum(cell not in published for cell in cells)


async def count_once(
    engine: AsyncEngine,
    bus: Bus,
    settings: Settings,
    now: datetime,
    *,
    noise_key: bytes | None = None,
) -> int:
    """Count every audience for the windows ``now`` falls in; the number of messages
    published. One transaction per audience, committed only after the broker acked its
    messages, so the table never says what the topic did not (a failed publish rolls
    back and the next run publishes it). Several activation processes may run this at
    once: an advisory lock per audience lets one count it while the others skip it.
    ``noise_key``: the noise's secret (see the module docstring); None draws a fresh one,
    i.e. fresh noise."""
    check_settings(settings)
    noise = None
    if settings.dmp_epsilon is not None:
        noise = LaplaceNoise(settings.dmp_epsilon, noise_key or secrets.token_bytes(32))
    topic = settings.topics.dmp_audience_counts
    async with engine.connect() as conn:
        ids = list((await conn.execute(select(audiences.c.id).order_by(audiences.c.id))).scalars())
    published = 0
    for audience_id in ids:

        async def work(conn: AsyncConnection, audience_id: uuid.UUID = audience_id) -> int:
            records = await _count_audience(conn, audience_id, settings, now, noise, topic)
            if records:
                await bus.publish_many(records)
            return len(records)

        n = await retrying(engine, work)
        metrics.dmp_buckets.labels("published").inc(n)
        published += n
    return published


async def run_counts(
    engine: AsyncEngine, bus: Bus, settings: Settings, stop: asyncio.Event
) -> None:
    """Count every ``settings.dmp_interval_s`` until ``stop``; a failed run is logged and
    the next one tries again (a timer that died quietly would freeze the feed)."""
    check_settings(settings)
    configured = settings.dmp_noise_key
    noise_key = configured.get_secret_value().encode() if configured else secrets.token_bytes(32)
    while not stop.is_set():
        try:
            n = await count_once(engine, bus, settings, datetime.now(UTC), noise_key=noise_key)
            log.debug("DMP counts: %d messages published", n)
        except BusUnavailable as exc:
            log.warning("DMP counts not published (bus unavailable), next run retries: %s", exc)
        except Exception:
            log.exception("DMP count run failed; the next run tries again")
        await stopped_within(stop, settings.dmp_interval_s)


# --- reads, for the API ------------------------------------------------------------------


async def read_counts(
    conn: AsyncConnection,
    *,
    audience_id: uuid.UUID | None = None,
    window: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Stored counts, newest window first: exactly the published fields."""
    t = dmp_audience_counts.c
    stmt = select(
        t.audience_id, t.window, t.window_start, t.dimension, t.bucket, t.count, t.epsilon
    )
    if audience_id is not None:
        stmt = stmt.where(t.audience_id == audience_id)
    if window is not None:
        stmt = stmt.where(t.window == window)
    if since is not None:
        stmt = stmt.where(t.window_start >= since)
    stmt = stmt.order_by(
        t.window_start.desc(),
        t.audience_id,
        t.window,
        t.dimension != OVERALL,
        t.dimension,
        t.bucket,
    ).limit(limit)
    return [dict(r._mapping) for r in await conn.execute(stmt)]


async def audience_exists(conn: AsyncConnection, audience_id: uuid.UUID) -> bool:
    found = await conn.execute(select(audiences.c.id).where(audiences.c.id == audience_id))
    return found.first() is not None
