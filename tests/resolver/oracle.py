"""A second, independent implementation of the resolver's rules, and realistic histories to
hold the real resolver to it.

Why: the real resolver is batched, concurrent and written in SQL round trips; this is the
same specification (docs/identity-resolution.md and docs/computed-traits.md) as a plain
sequential union-find over the events in arrival order, small enough to be checked by
reading. It imports nothing from ``cdp_stream.resolver``; the only project code it uses is
the collector's ``intake``, with the identity rules it routes by (to turn raw Segment
calls into the enriched records the resolver really consumes). Pure Python, no I/O.

* :func:`generate` - a seeded history of a few people with ground truth: anonymous
  browsing, sign-ins, email-platform events known only by email address, purchases,
  campaign pages, shared devices, blocked ids; shuffled (or delayed), with duplicates.
* :func:`enrich` - the (key, value) records the collector would publish for it.
* :func:`expected_state` - what the database must hold afterwards: identity groups, and
  per group traits, computed traits and which events it owns; optionally with splits an
  operator made part-way (links across them refused, as per-type limits refuse).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import phonenumbers

from cdp_stream.collector.intake import intake
from cdp_stream.identity import IdentityRules
from cdp_stream.settings import Settings

Ref = str  # "type:value", normalized
Key = tuple[str, str]  # (sourceId, messageId): what the resolver dedupes on
Group = frozenset[Ref]

# -- the rules, re-implemented ---------------------------------------------------------

PRIORITY = ("user_id", "email", "phone", "anonymous_id", "device_id", "advertising_id")
LIMITS = {"user_id": 1}
DEFAULT_LIMIT = 5
# The documented defaults of CDP_IDENTITY_BLOCKED_VALUES that the generator sends (the
# oracle never needs to know more: nothing else blocked-looking is ever generated).
BLOCKED = frozenset({"", "undefined", "null", "0", "anonymous", "none", "nil", "nan", "-1"})
_ZEROS_AND_DASHES = re.compile(r"^[0-]*$")
EMAIL_COUNTERS = {
    "email opened": "email_opens",
    "email link clicked": "email_clicks",
    "email bounced": "email_bounces",
}
TOUCH_FIELDS = ("at", "source", "medium", "campaign", "referrer")


def normalize(type_: str, raw: object) -> str | None:
    """The value an identifier is stored under, or None when it must not link anything."""
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        return None
    value = str(raw).strip()
    if value.lower() in BLOCKED or _ZEROS_AND_DASHES.fullmatch(value):
        return None
    if type_ == "email":
        return value.lower()
    if type_ == "phone":
        try:
            parsed = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            return value
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return value


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def identifiers(event: Mapping[str, Any]) -> list[Ref]:
    """The event's usable identifiers, highest priority first, without repeats.

    (``context.externalIds`` is not modelled: the generator never sends it.)
    """
    context = _dict(event.get("context"))
    traits, ctx_traits, device = (
        _dict(event.get("traits")),
        _dict(context.get("traits")),
        _dict(context.get("device")),
    )
    raw: dict[str, list[object]] = {
        "user_id": [event.get("userId")],
        "email": [traits.get("email"), ctx_traits.get("email")],
        "phone": [traits.get("phone"), ctx_traits.get("phone")],
        "anonymous_id": [event.get("anonymousId")],
        "device_id": [device.get("id")],
        "advertising_id": [device.get("advertisingId")],
    }
    refs = [f"{t}:{v}" for t in PRIORITY for r in raw[t] if (v := normalize(t, r)) is not None]
    return list(dict.fromkeys(refs))


def timestamp(event: Mapping[str, Any]) -> str:
    """The event time as fixed-width UTC text (compares correctly as a string)."""
    dt = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_traits(event: Mapping[str, Any]) -> dict[str, Any]:
    """``context.traits``, overridden by ``traits`` on identify calls."""
    out = dict(_dict(_dict(event.get("context")).get("traits")))
    if event.get("type") == "identify":
        out.update(_dict(event.get("traits")))
    return out


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def expected_traits(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per trait, the value of the newest event setting it (equal times: larger JSON)."""
    best: dict[str, tuple[str, bytes, Any]] = {}
    for e in events:
        ts = timestamp(e)
        for name, value in event_traits(e).items():
            candidate = (ts, _json(value), value)
            if name not in best or candidate[:2] > best[name][:2]:
                best[name] = candidate
    return {name: v[2] for name, v in best.items()}


def _micros(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int((Decimal(repr(value)) * 1_000_000).to_integral_value())


def _touch(event: Mapping[str, Any], ts: str) -> dict[str, Any] | None:
    context = _dict(event.get("context"))
    campaign, page = _dict(context.get("campaign")), _dict(context.get("page"))
    touch = {
        "at": ts,
        "source": campaign.get("source"),
        "medium": campaign.get("medium"),
        "campaign": campaign.get("name"),
        "referrer": page.get("referrer") or None,
    }
    if any(isinstance(touch[k], str) and touch[k] for k in TOUCH_FIELDS[1:]):
        return touch
    return None


def expected_computed(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The computed traits of a profile holding exactly ``events``, straight from their
    definitions (counts, min/max, sums) rather than as a fold: a different route to the
    same numbers. Zero counters are left out (see :func:`comparable`)."""
    stamps = [timestamp(e) for e in events]
    out: dict[str, Any] = {
        "event_count": len(events),
        "first_seen": min(stamps),
        "last_seen": max(stamps),
        "channels": sorted({e.get("channel") or "other" for e in events}),
        "page_views": sum(e.get("type") == "page" for e in events),
    }
    names = [
        e["event"].strip().lower()
        if e.get("type") == "track" and isinstance(e.get("event"), str)
        else ""
        for e in events
    ]
    for name, counter in EMAIL_COUNTERS.items():
        out[counter] = names.count(name)
    keyed: dict[str, list[tuple[int, str]]] = {}  # order_id -> every report (micros, cur)
    unkeyed: list[tuple[str, int]] = []
    refunds: dict[str, list[int | None]] = {}
    unkeyed_refunds: list[tuple[str, int]] = []
    order_times: list[str] = []
    touches: list[tuple[str, str, dict[str, Any]]] = []
    for e, name, ts in zip(events, names, stamps, strict=True):
        if name in ("order completed", "order refunded"):
            props = _dict(e.get("properties"))
            amount = props["revenue"] if "revenue" in props else props.get("total")
            currency = props.get("currency")
            currency = (
                currency.strip().upper()
                if isinstance(currency, str) and currency.strip()
                else "USD"
            )
            order_id = props.get("order_id")
            if isinstance(order_id, str):
                order_id = order_id.strip() or None
            elif isinstance(order_id, int) and not isinstance(order_id, bool):
                order_id = str(order_id)
            else:
                order_id = None
            number = isinstance(amount, int | float) and not isinstance(amount, bool)
            if name == "order completed":
                order_times.append(ts)
                if order_id is None:
                    unkeyed.append((currency, _micros(amount)))
                else:
                    keyed.setdefault(order_id, []).append((_micros(amount), currency))
            elif order_id is not None:
                refunds.setdefault(order_id, []).append(abs(_micros(amount)) if number else None)
            elif number:
                unkeyed_refunds.append((currency, abs(_micros(amount))))
        if (touch := _touch(e, ts)) is not None:
            touches.append((ts, str(e.get("messageId")), touch))
    # one value per order_id: the largest report; a refund without amount is the whole order
    kept = {oid: max(reports) for oid, reports in keyed.items()}
    refunded = {
        oid: None if None in reports else max(r for r in reports if r is not None)
        for oid, reports in refunds.items()
    }
    orders: dict[str, dict[str, int]] = {}
    for currency in sorted({c for _, c in kept.values()} | {c for c, _ in unkeyed}):
        mine = [(oid, m) for oid, (m, c) in kept.items() if c == currency]
        gross = sum(m for _, m in mine) + sum(m for c, m in unkeyed if c == currency)
        back = sum(
            m if (r := refunded[oid]) is None else min(m, r) for oid, m in mine if oid in refunded
        )
        back += sum(m for c, m in unkeyed_refunds if c == currency)
        count = len(mine) + sum(1 for c, _ in unkeyed if c == currency)
        orders[currency] = {"count": count, "micros": max(0, gross - back)}
    if orders:
        top = max(o["count"] for o in orders.values())
        currency = sorted(c for c, o in orders.items() if o["count"] == top)[0]
        main = orders[currency]
        out |= {
            "orders": orders,
            "order_count": sum(o["count"] for o in orders.values()),
            "last_order_at": max(order_times),
            "currency": currency,
            "total_revenue": float(Decimal(main["micros"]) / 1_000_000),
            "average_order_value": float(Decimal(main["micros"]) / main["count"] / 1_000_000),
        }
    if touches:
        out["first_touch"] = min(touches, key=lambda t: t[:2])[2]
        out["last_touch"] = max(touches, key=lambda t: t[:2])[2]
    return comparable(out)


MONEY = ("total_revenue", "average_order_value")


def comparable(computed: Mapping[str, Any]) -> dict[str, Any]:
    """A computed value in the form both sides are compared in: zero/empty fields dropped
    (the docstring does not say whether a zero counter is stored) and touches reduced to
    their documented fields."""
    out: dict[str, Any] = {}
    for name, value in computed.items():
        if value in (0, None, [], {}):
            continue
        if name in ("first_touch", "last_touch") and isinstance(value, dict):
            value = {k: value.get(k) for k in TOUCH_FIELDS}
        out[name] = value
    return out


def computed_diff(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """field -> (actual, expected) where they differ; money within a micro-unit is equal
    (the average is a rounded quotient, which two exact routes may round apart)."""
    a, e = comparable(actual), comparable(expected)
    diff = {}
    for name in sorted(a.keys() | e.keys()):
        x, y = a.get(name), e.get(name)
        money = name in MONEY and isinstance(x, int | float) and isinstance(y, int | float)
        if money and abs(x - y) <= 1.5e-6:  # type: ignore[operator]
            continue
        if x != y:
            diff[name] = (x, y)
    return diff


@dataclass
class Expected:
    """What the database must hold after the events: see :func:`expected_state`."""

    groups: set[Group]
    traits: dict[Group, dict[str, Any]]
    computed: dict[Group, dict[str, Any]]
    event_group: dict[Key, Group]  # every stored event -> the group of the profile owning it
    parked: list[Key] = field(default_factory=list)  # no usable identifier: never stored
    refused: list[tuple[Key, Ref]] = field(default_factory=list)  # merges/claims refused


class _UnionFind:
    """Profiles as union-find nodes; each root knows its identifiers."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.ids: list[set[Ref]] = []
        self.owner: dict[Ref, int] = {}

    def new(self) -> int:
        self.parent.append(len(self.parent))
        self.ids.append(set())
        return len(self.parent) - 1

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def owner_of(self, ref: Ref) -> int | None:
        node = self.owner.get(ref)
        return None if node is None else self.find(node)

    def claim(self, root: int, ref: Ref) -> None:
        self.owner[ref] = root
        self.ids[root].add(ref)

    def union(self, keep: int, gone: int) -> None:
        self.parent[gone] = keep
        self.ids[keep] |= self.ids[gone]
        self.ids[gone] = set()


def within_limits(refs: Iterable[Ref]) -> bool:
    counts = Counter(r.split(":", 1)[0] for r in refs)
    return all(n <= LIMITS.get(t, DEFAULT_LIMIT) for t, n in counts.items())


def expected_state(
    events: Iterable[Mapping[str, Any]],
    splits: Mapping[int, Sequence[tuple[Ref, Ref]]] | None = None,
) -> Expected:
    """Run the identity rules over ``events`` (enriched, in arrival order, duplicates
    included) one at a time, then derive each final group's state from its events.

    ``splits``: just before the event at arrival index ``i``, an operator splits the
    profiles holding each pair of identifiers (what an unmerge records): from then on a
    link between their groups, whatever else either merges with, is refused."""
    uf = _UnionFind()
    home: dict[Key, int] = {}
    stored: dict[Key, Mapping[str, Any]] = {}
    parked: list[Key] = []
    refused: list[tuple[Key, Ref]] = []
    apart: list[tuple[int, int]] = []

    def split(a: int, b: int) -> bool:
        return any({uf.find(x), uf.find(y)} == {a, b} for x, y in apart)

    for i, event in enumerate(events):
        for ref_a, ref_b in (splits or {}).get(i, ()):
            node_a, node_b = uf.owner_of(ref_a), uf.owner_of(ref_b)
            if node_a is not None and node_b is not None and node_a != node_b:
                apart.append((node_a, node_b))
        key = (str(event["sourceId"]), str(event["messageId"]))
        if key in stored or key in parked:
            continue  # a duplicate: the resolver dedupes on (sourceId, messageId)
        refs = identifiers(event)
        if not refs:
            parked.append(key)
            continue
        group: int | None = None
        for ref in refs:
            owner = uf.owner_of(ref)
            if group is None:  # the first identifier's profile, or a new one
                group = owner if owner is not None else uf.new()
                if owner is None:
                    uf.claim(group, ref)
            elif owner == group:
                continue
            elif owner is not None:
                if not split(group, owner) and within_limits(uf.ids[group] | uf.ids[owner]):
                    uf.union(group, owner)
                else:
                    refused.append((key, ref))
            elif within_limits(uf.ids[group] | {ref}):
                uf.claim(group, ref)
            else:
                refused.append((key, ref))
        assert group is not None
        home[key] = group
        stored[key] = event

    members: dict[int, list[Mapping[str, Any]]] = {}
    for key, node in home.items():
        members.setdefault(uf.find(node), []).append(stored[key])
    groups = {root: frozenset(uf.ids[root]) for root in members}
    return Expected(
        groups=set(groups.values()),
        traits={groups[r]: expected_traits(evs) for r, evs in members.items()},
        computed={groups[r]: expected_computed(evs) for r, evs in members.items()},
        event_group={k: groups[uf.find(n)] for k, n in home.items()},
        parked=parked,
        refused=refused,
    )


# -- the generator ---------------------------------------------------------------------

WEB, ESP = "src_oracle_web", "src_oracle_esp"  # the website's source, the email platform's
BLOCKED_SENT = ("undefined", "null", "0", "anonymous")
START = datetime(2025, 3, 1, tzinfo=UTC)
RECEIVED_AT = datetime(2025, 6, 1, tzinfo=UTC)  # after every generated timestamp
NAMES = ("Ada", "Grace", "Linus", "Alan", "Barbara", "Ken", "Margaret", "Dennis", "Edsger")
PLANS = ("free", "pro", "team", "enterprise")
PAGES = ("/", "/pricing", "/blog/cdp", "/docs", "/shop/sku-17", "/shop/sku-42", "/signup")
REFERRERS = ("https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x1")
CAMPAIGNS = (
    {"name": "spring_sale", "source": "google", "medium": "cpc"},
    {"name": "newsletter_w12", "source": "newsletter", "medium": "email", "content": "hero"},
    {"name": "retarget", "source": "facebook", "medium": "social", "term": "shoes"},
)
EMAIL_EVENTS = ("Email Opened", "Email Link Clicked", "Email Bounced", "email opened")
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"


@dataclass
class Person:
    """Ground truth: one human and every identifier they use."""

    index: int
    user_id: str
    name: str
    emails: list[str]
    phone: str | None
    devices: list[str]  # private anonymousIds
    device_id: str | None  # context.device.id of their phone app
    shared: list[str] = field(default_factory=list)  # anonymousIds shared with someone

    def refs(self) -> set[Ref]:
        """Every normalized identifier this person may send (shared devices included)."""
        refs = {f"user_id:{self.user_id}", *(f"email:{e}" for e in self.emails)}
        refs |= {f"anonymous_id:{a}" for a in self.devices + self.shared}
        if self.phone:
            refs.add(f"phone:{self.phone}")
        if self.device_id:
            refs.add(f"device_id:{self.device_id}")
        return refs


@dataclass
class History:
    """A generated history: what was sent, in arrival order, and who really sent it."""

    prefix: str
    people: list[Person]
    shared: dict[Ref, tuple[int, ...]]  # shared anonymous_id ref -> the people using it
    sent: list[tuple[str, dict[str, Any]]]  # (sourceId, raw Segment event), arrival order


class _Builder:
    def __init__(self, rng: random.Random, prefix: str) -> None:
        self.rng = rng
        self.prefix = prefix
        self.count = 0
        self.web_ids: list[str] = []

    def message_id(self, source: str) -> str:
        # Now and then the email platform's id equals a website event's: different
        # sources, so two different events that must both be stored.
        if source == ESP and self.web_ids and self.rng.random() < 0.03:
            return self.web_ids.pop(self.rng.randrange(len(self.web_ids)))
        self.count += 1
        mid = f"{self.prefix}-m{self.count:06d}"
        if source == WEB:
            self.web_ids.append(mid)
        return mid

    def web_context(self, with_touch: bool) -> dict[str, Any]:
        rng = self.rng
        path = rng.choice(PAGES)
        page = {"path": path, "url": f"https://shop.example.com{path}", "title": path}
        context: dict[str, Any] = {
            "library": {"name": "analytics.js", "version": "5.2.0"},
            "locale": "en-US",
            "page": page,
        }
        if with_touch:
            if rng.random() < 0.6:
                page["referrer"] = rng.choice(REFERRERS)
            if rng.random() < 0.6 or "referrer" not in page:
                context["campaign"] = dict(rng.choice(CAMPAIGNS))
        return context


def _phone(prefix: str, index: int) -> str:
    """A North American number in E.164, unique to this prefix and person."""
    rng = random.Random(f"{prefix}/{index}")
    return f"+1{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"


def _people(
    rng: random.Random, prefix: str, n: int
) -> tuple[list[Person], dict[Ref, tuple[int, ...]]]:
    people = []
    for i in range(n):
        name = rng.choice(NAMES)
        people.append(
            Person(
                index=i,
                user_id=f"{prefix}-u{i}",
                name=name,
                emails=[
                    f"{name.lower()}.{i}.{k}@{prefix}.example.com" for k in range(rng.randint(1, 2))
                ],
                phone=_phone(prefix, i) if rng.random() < 0.5 else None,
                devices=[f"{prefix}-a{i}-{k}" for k in range(rng.randint(1, 3))],
                device_id=f"{prefix}-dev{i}" if rng.random() < 0.3 else None,
            )
        )
    shared: dict[Ref, tuple[int, ...]] = {}
    for s in range(rng.randint(0, max(1, n // 2))):
        free = [p for p in people if len(p.shared) < 2]
        if len(free) < 2:
            break
        pair = rng.sample(free, 2)
        anon = f"{prefix}-shared{s}"
        for p in pair:
            p.shared.append(anon)
        shared[f"anonymous_id:{anon}"] = tuple(sorted(p.index for p in pair))
    return people, shared


def _event(b: _Builder, p: Person, kind: str, ts: str) -> tuple[str, dict[str, Any]]:
    """One call of ``kind`` by ``p`` at ``ts``: (sourceId, raw event)."""
    rng = b.rng
    source = ESP if kind == "email" else WEB
    e: dict[str, Any] = {"messageId": b.message_id(source), "timestamp": ts}
    device = rng.choice(p.devices)
    if kind == "browse":  # anonymous page view, sometimes from a campaign
        e |= {"type": "page", "anonymousId": device, "name": "Page"}
        e["context"] = b.web_context(with_touch=rng.random() < 0.4)
    elif kind == "view":  # anonymous product view, on the web or in the phone app
        e |= {"type": "track", "event": "Product Viewed", "anonymousId": device}
        e["properties"] = {"product_id": f"sku-{rng.randrange(50)}", "price": 19.99}
        if p.device_id and rng.random() < 0.5:
            e["anonymousId"] = p.devices[0]
            e["context"] = {"device": {"id": p.device_id, "type": "ios"}, "app": {"name": "Shop"}}
        else:
            e["context"] = b.web_context(with_touch=rng.random() < 0.2)
    elif kind == "signin":
        email = rng.choice(p.emails)
        if rng.random() < 0.2:  # as typed: identifiers are normalized, traits kept as sent
            email = f"  {email.upper()} " if rng.random() < 0.5 else email.capitalize()
        traits: dict[str, Any] = {"email": email, "name": p.name, "plan": rng.choice(PLANS)}
        if p.phone and rng.random() < 0.6:
            traits["phone"] = p.phone
        if rng.random() < 0.3:
            traits["address"] = {"city": rng.choice(("Oslo", "Lyon", "Porto")), "country": "EU"}
        e |= {"type": "identify", "userId": p.user_id, "traits": traits}
        if rng.random() < 0.8:
            e["anonymousId"] = device
        e["context"] = b.web_context(with_touch=False)
    elif kind == "user_page":
        e |= {"type": "page", "userId": p.user_id, "name": "Page"}
        e["anonymousId"] = device if rng.random() < 0.8 else rng.choice(BLOCKED_SENT)
        e["context"] = b.web_context(with_touch=rng.random() < 0.3)
    elif kind == "order":
        amount = round(rng.uniform(5, 400), 2)
        currency = rng.choice(("EUR", "USD", "USD", "eur"))
        props: dict[str, Any] = {"order_id": e["messageId"], "currency": currency}
        props["revenue" if rng.random() < 0.85 else "total"] = amount
        e |= {"type": "track", "event": "Order Completed", "userId": p.user_id}
        e["properties"] = props
        if rng.random() < 0.5:
            e["anonymousId"] = device
        e["context"] = b.web_context(with_touch=False)
    elif kind == "email":  # the email platform knows only the address
        e |= {"type": "track", "event": rng.choice(EMAIL_EVENTS)}
        e["anonymousId"] = rng.choice(BLOCKED_SENT)  # the collector needs some id
        e["properties"] = {"campaign_id": f"c{rng.randrange(5)}", "email_subject": "News"}
        e["context"] = {"traits": {"email": rng.choice(p.emails)}}
    elif kind == "shared":  # signed in on a device someone else also uses
        e |= {"userId": p.user_id, "anonymousId": rng.choice(p.shared)}
        call = rng.choice(("page", "track", "identify"))
        e["type"] = call
        if call == "track":
            e["event"] = "Product Viewed"
        elif call == "identify":
            e["traits"] = {"plan": rng.choice(PLANS), "last_device": "shared"}
        e["context"] = b.web_context(with_touch=rng.random() < 0.2)
    elif kind == "blocked":  # broken tracking code: a junk anonymousId next to the userId
        e |= {"type": "track", "event": "Button Clicked", "userId": p.user_id}
        e["anonymousId"] = rng.choice(BLOCKED_SENT)
        e["context"] = b.web_context(with_touch=False)
    else:
        raise ValueError(kind)
    return source, e


KINDS = {
    "browse": 20,
    "view": 14,
    "signin": 12,
    "user_page": 12,
    "order": 9,
    "email": 12,
    "shared": 8,
    "blocked": 5,
}


def generate(
    seed: int,
    prefix: str,
    *,
    people: int,
    events: int,
    shuffle: bool = True,
    duplicates: float = 0.05,
) -> History:
    """A seeded history of ``events`` distinct calls by ``people`` people.

    Timestamps advance per person (now and then one repeats, to exercise the tie rules);
    arrival is a full shuffle or, with ``shuffle=False``, time order with ~10% of the
    events delayed. About ``duplicates`` of the calls then arrive a second time, later.
    """
    rng = random.Random(seed)
    crowd, shared = _people(rng, prefix, people)
    b = _Builder(rng, prefix)
    clocks = [START + timedelta(days=rng.uniform(0, 20)) for _ in crowd]
    stamps: list[list[str]] = [[] for _ in crowd]
    made: list[tuple[str, str, dict[str, Any]]] = []  # (ts, sourceId, event)
    for _ in range(events):
        p = rng.choice(crowd)
        kinds = [k for k in KINDS if k != "shared" or p.shared]
        kind = rng.choices(kinds, [KINDS[k] for k in kinds])[0]
        if stamps[p.index] and rng.random() < 0.08:
            ts = rng.choice(stamps[p.index])  # same instant as an earlier call: a tie
        else:
            clocks[p.index] += timedelta(seconds=rng.expovariate(1 / 3600))
            ts = clocks[p.index].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        stamps[p.index].append(ts)
        source, event = _event(b, p, kind, ts)
        made.append((ts, source, event))

    if shuffle:
        rng.shuffle(made)
    else:
        made.sort(key=lambda m: m[0])
        for _ in range(len(made) // 10):  # delayed: arrives later than its time says
            i = rng.randrange(len(made))
            late = made.pop(i)
            made.insert(rng.randint(i, len(made)), late)
    arrival = [(source, event) for _, source, event in made]
    for _ in range(round(len(arrival) * duplicates)):
        i = rng.randrange(len(arrival))
        source, event = arrival[i]
        arrival.insert(rng.randint(i + 1, len(arrival)), (source, dict(event)))
    return History(prefix, crowd, shared, arrival)


def enrich(sent: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[bytes, bytes]]:
    """The records the collector publishes for ``sent`` (its own ``intake``): routing key
    and enriched JSON, in the same order."""
    out: list[tuple[bytes, bytes] | None] = [None] * len(sent)
    by_source: dict[str, list[int]] = {}
    for i, (source, _) in enumerate(sent):
        by_source.setdefault(source, []).append(i)
    for source, indexes in by_source.items():
        result = intake(
            {"batch": [sent[i][1] for i in indexes]},
            "batch",
            settings=Settings(max_batch_events=max(len(indexes), 1)),
            rules=IdentityRules.from_settings(Settings()),
            source_id=source,
            received_at=RECEIVED_AT,
            ip="203.0.113.9",
            user_agent=UA,
        )
        if result.rejected:
            raise AssertionError(f"intake rejected generated events: {result.rejected[:3]}")
        for i, accepted in zip(indexes, result.accepted, strict=True):
            out[i] = (accepted.key, accepted.value)
    return [r for r in out if r is not None]


def enriched_events(history: History) -> list[dict[str, Any]]:
    """The enriched events, as dicts, in arrival order."""
    return [orjson.loads(value) for _, value in enrich(history.sent)]


def without(group: Group, refs: Iterable[Ref]) -> Group:
    """``group`` minus ``refs`` (the shared devices, whose placement depends on order)."""
    return group - frozenset(refs)


def describe(events: Iterable[Mapping[str, Any]]) -> str:
    """One line per event, for failure messages: what the resolver was given."""
    lines = []
    for i, e in enumerate(events):
        what = e.get("event") or ""
        traits = event_traits(e)
        lines.append(
            f"{i:3d} {e['sourceId']}/{e['messageId']} {e['type']} {what!s:20} "
            f"{timestamp(e)} ids={identifiers(e)}" + (f" traits={traits}" if traits else "")
        )
    return "\n".join(lines)
