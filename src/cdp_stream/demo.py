"""``cdp-stream demo``: a seeded, realistic population sent through the real collector.

Each person browses on one to three devices (each its own anonymousId, user agent and
country), arrives from a campaign, a referrer or directly, and most sign in on each
device (an ``identify`` with their userId, email and name), which the resolver merges
into one profile; some never sign in (anonymous profiles), some share a device with
someone else (a second userId on one anonymousId: a refused link). Signed-in people get
emails (delivered, opened, clicked), place orders and sometimes refund one, and state a
consent choice (some refuse marketing and advertising: they leave the DMP counts).

The same seed gives the same people and events, message ids included, so sending twice
stores nothing twice. Everything goes over HTTP to ``/v1/batch`` with a write key, as a
backend SDK would; then, given an API token, it defines a few audiences so that the
console's audience and DMP pages have something to show. Generation (``population``) is
pure; ``send`` does the I/O.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx

from cdp_stream.retry import retry

FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Linus",
    "Margaret",
    "Ken",
    "Barbara",
    "Edsger",
    "Frances",
    "Dennis",
    "Radia",
    "Tim",
    "Hedy",
    "John",
    "Katherine",
    "Niklaus",
    "Sophie",
    "Yukihiro",
]
LAST = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Torvalds",
    "Hamilton",
    "Thompson",
    "Liskov",
    "Dijkstra",
    "Allen",
    "Ritchie",
    "Perlman",
    "Berners-Lee",
    "Lamarr",
    "McCarthy",
    "Johnson",
    "Wirth",
    "Wilson",
    "Matsumoto",
]
DOMAINS = ["example.com", "mail.example.org", "example.net"]
COUNTRIES = ["US", "US", "US", "DE", "DE", "GB", "FR", "NL", "ES", "IT", "JP", "BR"]
AGENTS = {
    "desktop": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0",
    "mobile": "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15",
    "tablet": "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15",
}
PAGES = [
    "/",
    "/pricing",
    "/products/notebook",
    "/products/pen",
    "/products/bag",
    "/blog/launch",
    "/docs",
    "/checkout",
]
CAMPAIGNS = [
    {"source": "google", "medium": "cpc", "name": "spring"},
    {"source": "newsletter", "medium": "email", "name": "weekly"},
    {"source": "facebook", "medium": "social", "name": "launch"},
]
REFERRERS = ["https://news.example.org/article", "https://www.google.com/"]
PRODUCTS = [("notebook", 12.5), ("pen", 3.0), ("bag", 49.0), ("lamp", 89.0)]
PLANS = ["free", "free", "pro", "team"]

# The audiences the demo defines (with an API token): one per page of the console's story.
AUDIENCES: dict[str, dict[str, Any]] = {
    "Customers": {"computed": "order_count", "gte": 1},
    "Pro plan": {"trait": "plan", "eq": "pro"},
    "Pricing page visitors (30 days)": {
        "event": {"type": "page", "where": {"path": {"starts_with": "/pricing"}}, "within": "30d"}
    },
}


@dataclass(frozen=True)
class Person:
    email: str | None  # None: never signs in
    user_id: str | None
    events: list[dict[str, Any]]


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def person(rng: random.Random, n: int, now: datetime) -> Person:
    """The ``n``-th person of the population and every event they cause, oldest first."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    signs_in = rng.random() < 0.85
    user_id = f"u{n:06d}" if signs_in else None
    email = f"{first}.{last}.{n}@{rng.choice(DOMAINS)}".lower() if signs_in else None
    country = rng.choice(COUNTRIES)
    # At most ~60 events two hours apart: all of them fit between start and now.
    start = now - timedelta(days=rng.uniform(6, 29), seconds=rng.uniform(0, 86_400))
    clock = [start]
    events: list[dict[str, Any]] = []

    def at() -> str:
        clock[0] += timedelta(minutes=rng.uniform(1, 120))
        return _stamp(clock[0])

    def add(event: dict[str, Any], context: dict[str, Any]) -> None:
        mid = uuid.UUID(int=rng.getrandbits(128), version=4)
        events.append({**event, "messageId": f"demo-{mid}", "timestamp": at(), "context": context})

    for d in range(rng.choice([1, 1, 2, 2, 3])):
        kind = rng.choice(["desktop", "desktop", "mobile", "tablet"]) if d else "desktop"
        device = {
            "userAgent": AGENTS[kind],
            "location": {"country": country},
            "device": {"type": kind},
        }
        anonymous_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        arrival: dict[str, Any] = {}
        roll = rng.random()
        if roll < 0.45:
            arrival = {"campaign": rng.choice(CAMPAIGNS)}
        elif roll < 0.7:
            arrival = {"page": {"referrer": rng.choice(REFERRERS)}}
        for i in range(rng.randint(2, 8)):
            path = rng.choice(PAGES)
            page = {"path": path, "url": f"https://shop.example.com{path}", "title": path}
            extra = arrival if i == 0 else {}
            page = {**page, **extra.get("page", {})}
            context = {**device, "page": page, **{k: v for k, v in extra.items() if k != "page"}}
            add(
                {"type": "page", "anonymousId": anonymous_id, "properties": {"path": path}},
                context,
            )
        if user_id is not None and rng.random() < 0.9:
            traits: dict[str, Any] = {
                "email": email,
                "first_name": first,
                "last_name": last,
                "plan": rng.choice(PLANS),
                "country": country,
            }
            if rng.random() < 0.3:
                traits["phone"] = f"+1 415 555 {n % 10_000:04d}"
            add(
                {
                    "type": "identify",
                    "userId": user_id,
                    "anonymousId": anonymous_id,
                    "traits": traits,
                },
                device,
            )
            add(
                {
                    "type": "track",
                    "event": "Signed In",
                    "userId": user_id,
                    "anonymousId": anonymous_id,
                },
                device,
            )
        if d == 0 and rng.random() < 0.05 and user_id is not None:
            # A shared device: someone else signs in on it (a second user id: refused).
            add(
                {
                    "type": "identify",
                    "userId": f"u{n:06d}-guest",
                    "anonymousId": anonymous_id,
                    "traits": {"first_name": "Guest"},
                },
                device,
            )
    if user_id is None:
        return Person(None, None, events)
    server = {"traits": {"email": email}}
    refuses = rng.random() < 0.15
    choice = {"categoryPreferences": {"marketing": not refuses, "advertising": not refuses}}
    add(
        {"type": "track", "event": "Consent Updated", "userId": user_id},
        {**server, "consent": choice},
    )
    for subject in rng.sample(["Welcome", "Spring sale", "New arrivals", "Your cart"], 2):
        props = {"email_subject": subject, "email_id": f"e-{n}-{subject[:3].lower()}"}
        add(
            {"type": "track", "event": "Email Delivered", "userId": user_id, "properties": props},
            server,
        )
        if rng.random() < 0.5:
            add(
                {"type": "track", "event": "Email Opened", "userId": user_id, "properties": props},
                server,
            )
            if rng.random() < 0.4:
                add(
                    {
                        "type": "track",
                        "event": "Email Link Clicked",
                        "userId": user_id,
                        "properties": props,
                    },
                    server,
                )
    for o in range(rng.choice([0, 0, 1, 1, 2, 3])):
        order_id = f"o-{n}-{o}"
        items = rng.sample(PRODUCTS, rng.randint(1, 3))
        revenue = round(sum(price for _, price in items), 2)
        products = [{"product_id": name, "price": price, "quantity": 1} for name, price in items]
        add(
            {
                "type": "track",
                "event": "Order Completed",
                "userId": user_id,
                "properties": {
                    "order_id": order_id,
                    "revenue": revenue,
                    "currency": "USD",
                    "products": products,
                },
            },
            server,
        )
        if rng.random() < 0.1:
            add(
                {
                    "type": "track",
                    "event": "Order Refunded",
                    "userId": user_id,
                    "properties": {"order_id": order_id},
                },
                server,
            )
    return Person(email, user_id, events)


def population(people: int, seed: int, now: datetime) -> Iterator[Person]:
    """``people`` people of the seeded population (the same seed, the same people)."""
    rng = random.Random(seed)
    for n in range(people):
        yield person(rng, n, now)


def batches(people: list[Person], size: int = 200) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(people done, events) batches for ``/v1/batch``, a person's events in one batch
    where they fit, in their order."""
    batch: list[dict[str, Any]] = []
    for done, someone in enumerate(people, 1):
        batch.extend(someone.events)
        if len(batch) >= size:
            yield done, batch
            batch = []
    if batch:
        yield len(people), batch


async def _post_batch(http: httpx.AsyncClient, events: list[dict[str, Any]]) -> None:
    r = await http.post("/v1/batch", json={"batch": events})
    if r.status_code in (429, 503):
        raise _Busy(float(r.headers.get("retry-after", "1")))
    if r.status_code != 200 or r.json().get("rejected"):
        raise DemoFailed(f"the collector answered {r.status_code}: {r.text[:300]}")


class _Busy(Exception):
    """The collector asked for the batch again in ``after`` seconds (429 or 503)."""

    def __init__(self, after: float) -> None:
        super().__init__(f"busy, retry in {after}s")
        self.after = after


class DemoFailed(Exception):
    """The collector or the API refused the demo: what it answered."""


async def send(
    url: str,
    write_key: str,
    people: list[Person],
    advance: Callable[[int], None],
    concurrency: int = 4,
) -> int:
    """Send every person's events to the collector at ``url``; the number of events sent.
    ``advance(n)`` is called as each batch is accepted (n people more are sent). A batch
    is retried on 503/429 after its Retry-After; anything else stops the demo."""
    queue: asyncio.Queue[tuple[int, list[dict[str, Any]]]] = asyncio.Queue()
    previous = 0
    for done, events in batches(people):
        queue.put_nowait((done - previous, events))
        previous = done
    sent = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while not queue.empty():
            count, events = queue.get_nowait()
            await retry(
                functools.partial(_post_batch, http, events),
                retry_if=lambda exc: isinstance(exc, _Busy),
                delays=itertools.repeat(1.0),
                after=lambda exc: exc.after if isinstance(exc, _Busy) else None,
            )
            sent += len(events)
            advance(count)

    auth = httpx.BasicAuth(write_key, "")
    async with httpx.AsyncClient(base_url=url, auth=auth, timeout=60) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return sent


async def define_audiences(url: str, token: str) -> list[str]:
    """Create the demo's audiences that do not exist yet; their names."""
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        r = await http.get("/v1/audiences")
        if r.status_code != 200:
            raise DemoFailed(f"the API answered {r.status_code} to the API token: {r.text[:300]}")
        existing = {a["name"] for a in r.json()}
        for name, rule in AUDIENCES.items():
            if name not in existing:
                made = await http.post("/v1/audiences", json={"name": name, "rule": rule})
                if made.status_code != 201:
                    raise DemoFailed(f"creating {name!r}: {made.status_code} {made.text[:300]}")
    return list(AUDIENCES)


async def resolved(url: str, token: str, email: str, within_s: float) -> bool:
    """Whether the person with ``email`` has a profile within ``within_s`` (the resolver
    caught up with what was sent)."""
    headers = {"authorization": f"Bearer {token}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        while loop.time() < deadline:
            r = await http.get(f"/v1/profiles/email:{email}")
            if r.status_code == 200:
                return True
            await asyncio.sleep(0.5)
    return False
