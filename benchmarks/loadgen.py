"""The open-loop HTTP load of ``benchmarks/pipeline.py``: a lean client and site-shaped traffic.

Lean, so that the load generator is not the ceiling: HTTP/1.1 over asyncio protocols on
uvloop, keep-alive connections opened before the clock starts, every request pre-built as
bytes before its phase begins (a Python HTTP client such as httpx spends ~1 ms of CPU per
request and tops out at a few thousand requests/s on this box).

Open-loop, so that latency is not hidden by coordinated omission: each request has a
scheduled send time (Poisson arrivals at the offered rate, fixed before the phase starts)
and its latency is counted from that time, not from when a free connection let it go out.
A server that stalls makes every request scheduled meanwhile late, and that shows.
``lateness`` (dispatch time minus scheduled time) says whether this process kept its own
schedule; when it does not, the figures are the generator's, and the report says so.

The traffic (``Site``): 70% of the events as single ``/v1/page`` (60%), ``/v1/track`` (30%)
and ``/v1/identify`` (10%) calls from a website library, spread over many keep-alive
connections; 30% in ``/v1/batch`` calls of 10-50 events from backend SDKs (orders,
subscriptions, identifies) over a few connections. 80% of the events are by ``people``
known people (``userId`` ``u{k}``, ``anonymousId`` ``a{k}``, email ``u{k}@example.com``),
20% by new visitors: anonymous ids never seen before, half of them coming back for more
pages, and their identify calls give them a user id and an email (anonymous, then known).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
import uvloop

UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
PAGES = ["/", "/pricing", "/blog/streaming-cdp", "/docs/quickstart", "/p/sku-1042", "/cart"]
TRACKS = ["Product Viewed", "Product Added", "Button Clicked", "Form Submitted", "Video Played"]
BACKEND = ["Order Completed", "Subscription Renewed", "Invoice Paid", "Email Delivered"]


class Answer(NamedTuple):
    status: int
    body: bytes


# -- the client ----------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight (as browsers do it)."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.head = 0  # length of the head of the answer being read (0: not parsed yet)
        self.end = 0  # where that answer ends in the buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head:
            cut = self.buffer.find(b"\r\n\r\n")
            if cut < 0:
                return
            self.head = cut + 4
            head = bytes(self.buffer[:cut]).lower()
            at = head.find(b"content-length:")
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop > 0 else len(head)]) if at > 0 else 0
            self.end = self.head + length
        if len(self.buffer) < self.end:
            return
        status = int(self.buffer[9:12])
        answer = Answer(status, bytes(self.buffer[self.head : self.end]))
        del self.buffer[: self.end]
        self.head = self.end = 0
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def request(self, data: bytes) -> Answer:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Pool:
    """Up to ``size`` keep-alive connections to 127.0.0.1:``port``, used in turn (a
    request takes the connection idle the longest), so traffic spreads over all of them
    like many browsers; a request that finds none idle waits for one."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size = port, size
        self.idle: deque[_Connection] = deque()
        self.count = 0
        self.freed = asyncio.Event()

    async def open(self) -> None:
        """Open every connection now, before the clock starts."""
        new = await asyncio.gather(*(self._connect() for _ in range(self.size - self.count)))
        self.idle.extend(new)

    async def _connect(self) -> _Connection:
        self.count += 1
        try:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, "127.0.0.1", self.port)
        except BaseException:
            self.count -= 1
            raise
        return conn

    async def request(self, data: bytes) -> Answer:
        conn = await self._take()
        try:
            answer = await conn.request(data)
        except BaseException:
            self._drop(conn)
            raise
        self.idle.append(conn)
        self.freed.set()
        return answer

    async def _take(self) -> _Connection:
        while True:
            while self.idle:
                conn = self.idle.popleft()
                if not conn.closed:
                    return conn
                self.count -= 1
            if self.count < self.size:
                return await self._connect()
            self.freed.clear()
            await self.freed.wait()

    def _drop(self, conn: _Connection) -> None:
        if conn.transport is not None:
            conn.transport.close()
        self.count -= 1
        self.freed.set()

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def post(path: str, auth: bytes, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    ) % (path.encode(), auth, len(body), body)


def get(path: str, auth: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: %s\r\n\r\n" % (
        path.encode(),
        auth,
    )


def basic(write_key: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{write_key}:".encode())


# -- open-loop scheduling ------------------------------------------------------------------


@dataclass
class Tally:
    """What the answers to one kind of request were, and when (ms from scheduled time)."""

    latencies: list[float] = field(default_factory=list)  # every answered request
    statuses: dict[int, int] = field(default_factory=dict)
    events: int = 0  # events in 2xx answers
    errors: int = 0  # connection failures
    unanswered: int = 0  # still open when the phase's grace time ran out
    lateness: list[float] = field(default_factory=list)  # ms, dispatch - schedule
    first_bad: str = ""

    def count(self, status: int, body: bytes, events: int, ms: float) -> None:
        self.latencies.append(ms)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300 and b'"rejected":[{' not in body:
            self.events += events
        elif not self.first_bad:
            self.first_bad = f"{status} {body[:300]!r}"

    def merge(self, other: Tally) -> None:
        self.latencies += other.latencies
        self.lateness += other.lateness
        for s, n in other.statuses.items():
            self.statuses[s] = self.statuses.get(s, 0) + n
        self.events += other.events
        self.errors += other.errors
        self.unanswered += other.unanswered
        self.first_bad = self.first_bad or other.first_bad


Send = Callable[[float], Awaitable[None]]  # called with the scheduled loop time


async def open_loop(schedule: list[tuple[float, Send]], tally: Tally, grace: float) -> None:
    """Dispatch each ``send`` at ``start + offset`` whatever is still in flight; then give
    the stragglers ``grace`` seconds and count what is left as unanswered."""
    loop = asyncio.get_running_loop()
    start, pending = loop.time(), set()
    for offset, send in schedule:
        at = start + offset
        if (delay := at - loop.time()) > 0.0005:
            await asyncio.sleep(delay)
        tally.lateness.append(1000 * (loop.time() - at))
        task = loop.create_task(send(at))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            task.cancel()
        tally.unanswered += len(late)


def poisson(rng: random.Random, rate: float, seconds: float) -> list[float]:
    """Arrival offsets of a Poisson process at ``rate``/s over ``seconds``."""
    out, t = [], 0.0
    while rate > 0 and (t := t + rng.expovariate(rate)) < seconds:
        out.append(t)
    return out


# -- the traffic ---------------------------------------------------------------------------


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Site:
    """Events as a website and its backends send them (see the module docstring)."""

    people: int
    prefix: str  # unique per generator and phase: message ids and new visitors' ids
    rng: random.Random
    visitors: list[str] = field(default_factory=list)
    made: int = 0

    def _id(self) -> str:
        self.made += 1
        return f"{self.prefix}-{self.made}"

    def _who(self) -> tuple[dict[str, Any], str | None]:
        """The ids of the sender: a known person (80%) or a new visitor (20%, half of
        them coming back); the user id to identify a new visitor with (None: known)."""
        if self.rng.random() < 0.8:
            k = self.rng.randrange(self.people)
            return {"userId": f"u{k}", "anonymousId": f"a{k}"}, None
        if not self.visitors or self.rng.random() < 0.5:
            self.visitors.append(f"v{self._id()}")
        anon = self.rng.choice(self.visitors[-500:])
        return {"anonymousId": anon}, f"n{anon}"

    def _context(self, path: str) -> dict[str, Any]:
        return {
            "library": {"name": "cdp.js", "version": "1.4.2"},
            "page": {
                "path": path,
                "url": f"https://shop.example.com{path}",
                "title": f"Example Shop - {path.strip('/') or 'home'}",
                "referrer": "https://www.google.com/",
                "search": "?utm_source=newsletter",
            },
            "campaign": {"source": "newsletter", "medium": "email", "name": "spring-sale"},
            "userAgent": UA,
            "locale": "en-GB",
            "timezone": "Europe/London",
            "screen": {"width": 1920, "height": 1080, "density": 1},
            "os": {"name": "Windows", "version": "10"},
            "device": {"type": "desktop"},
            "sessionId": self.rng.randrange(10**12),
        }

    def web(self, ts: str) -> tuple[str, dict[str, Any]]:
        """One website call: its route and its event."""
        ids, new_user = self._who()
        path = self.rng.choice(PAGES)
        event: dict[str, Any] = {**ids, "messageId": self._id(), "timestamp": ts}
        event["context"] = self._context(path)
        roll = self.rng.random()
        if roll < 0.6:
            event |= {"name": path, "properties": {"path": path, "section": "shop"}}
            return "page", event
        if roll < 0.9:
            props = {"product_id": f"sku-{self.rng.randrange(5000)}", "price": 49.9}
            return "track", event | {"event": self.rng.choice(TRACKS), "properties": props}
        uid = new_user or ids["userId"]
        traits = {"email": f"{uid}@example.com", "first_name": "Ada", "plan": "free"}
        return "identify", event | {"userId": uid, "traits": traits}

    def backend(self, ts: str) -> dict[str, Any]:
        """One backend SDK event (inside a batch)."""
        k = self.rng.randrange(self.people)
        event: dict[str, Any] = {"userId": f"u{k}", "messageId": self._id(), "timestamp": ts}
        event["context"] = {
            "library": {"name": "cdp-python", "version": "2.1.0"},
            "ip": "203.0.113.7",
            "externalIds": [{"id": f"cus_{k:08d}", "type": "stripe_customer_id"}],
        }
        if self.rng.random() < 0.2:
            traits = {"email": f"u{k}@example.com", "plan": "pro", "company": "Example Ltd"}
            traits |= {"first_name": "Ada", "last_name": "Lovelace", "title": "Head of Data"}
            address = {"city": "London", "country": "GB", "postal_code": "N1 9GU"}
            return event | {"type": "identify", "traits": traits | {"address": address}}
        order = self._id()
        items = [
            {
                "product_id": f"sku-{self.rng.randrange(5000)}",
                "name": "Trail Running Shoe",
                "category": "Shoes",
                "price": 19.5,
                "quantity": 1,
            }
            for _ in range(3)
        ]
        props = {"order_id": order, "revenue": 58.5, "currency": "EUR", "products": items}
        props |= {"shipping": 4.9, "tax": 9.75, "coupon": "SPRING10", "affiliation": "web"}
        props["checkout_id"] = f"chk_{self.rng.randrange(10**9)}"
        return event | {"type": "track", "event": self.rng.choice(BACKEND), "properties": props}


@dataclass
class Load:
    """One phase's pre-built requests: (offset s, kind, request bytes, events)."""

    requests: list[tuple[float, str, bytes, int]]
    events: int
    body_bytes: int


def build(rate: float, seconds: float, people: int, write_key: str, prefix: str, seed: int) -> Load:
    """``rate`` events/s for ``seconds``: 70% of them as single calls, 30% in batches."""
    rng = random.Random(seed)
    site, auth, t0 = Site(people, prefix, rng), basic(write_key), time.time()
    out, events, size = [], 0, 0
    for at in poisson(rng, 0.7 * rate, seconds):
        route, event = site.web(iso(t0 + at))
        body = orjson.dumps(event)
        out.append((at, "single", post(f"/v1/{route}", auth, body), 1))
        events, size = events + 1, size + len(body)
    for at in poisson(rng, 0.3 * rate / 30, seconds):  # batches of 10-50: 30 on average
        batch = [site.backend(iso(t0 + at)) for _ in range(rng.randint(10, 50))]
        body = orjson.dumps({"batch": batch})
        out.append((at, "batch", post("/v1/batch", auth, body), len(batch)))
        events, size = events + len(batch), size + len(body)
    out.sort(key=lambda r: r[0])
    return Load(out, events, size)


# -- the load process ----------------------------------------------------------------------


async def run_phase(load: Load, port: int, connections: int, grace: float) -> dict[str, Tally]:
    """Send ``load`` on its schedule; a tally per kind (single, batch), and ``schedule``:
    the generator's own lateness and the requests left unanswered."""
    tallies = {"single": Tally(), "batch": Tally(), "schedule": Tally()}
    pools = {"single": Pool(port, connections), "batch": Pool(port, max(2, connections // 16))}
    await asyncio.gather(*(p.open() for p in pools.values()))
    loop = asyncio.get_running_loop()

    def sender(kind: str, data: bytes, events: int) -> Send:
        pool, tally = pools[kind], tallies[kind]

        async def send(at: float) -> None:
            try:
                answer = await pool.request(data)
            except (OSError, ConnectionError):
                tally.errors += 1
                return
            tally.count(answer.status, answer.body, events, 1000 * (loop.time() - at))

        return send

    schedule = [(at, sender(kind, data, n)) for at, kind, data, n in load.requests]
    try:
        await open_loop(schedule, tallies["schedule"], grace)
    finally:
        for pool in pools.values():
            pool.close()
    return tallies


def generator(pipe: Any, port: int, write_key: str, people: int, connections: int) -> None:
    """A load process: for each ``(rate, seconds, seed)`` it receives, build the load,
    answer ``ready``, wait for ``go``, send it, answer the tallies; ``None`` ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    tag = uuid.uuid4().hex[:6]
    while (command := pipe.recv()) is not None:
        rate, seconds, seed, grace = command
        load = build(rate, seconds, people, write_key, f"g{tag}s{seed}", seed)
        pipe.send(("ready", load.events, load.body_bytes))
        pipe.recv()  # go
        tallies = uvloop.run(run_phase(load, port, connections, grace))
        pipe.send(tallies)
    with contextlib.suppress(OSError):
        pipe.close()
